"""Artifact bundles: a directory with manifest.json (plan, target, versions, sha256 per file) and its files."""
