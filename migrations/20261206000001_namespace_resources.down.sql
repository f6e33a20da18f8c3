DROP TABLE weir_namespace_resources;
