"""Stage orchestration from files: profile, search, export and compile, composed from the packages below."""
