DROP TABLE IF EXISTS weir_version_stats;
DROP TABLE IF EXISTS weir_rollouts;
DROP TABLE IF EXISTS weir_versions;
DROP TABLE IF EXISTS weir_functions;
