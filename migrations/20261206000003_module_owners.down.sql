DROP TABLE weir_module_owners;
