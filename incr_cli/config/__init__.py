"""config: the recipe (schema, YAML loading, overrides, presets). The ground every other wing reads."""
