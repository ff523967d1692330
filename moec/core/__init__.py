"""Bottom layer: errors, file I/O, the model config, bit plans, the weight inventory, formats and target presets."""
