"""The results store's schema: its tables (``cells``, ``results``, ``datasets``, ``scores``,
``attacks``), their columns, the schema version written to ``PRAGMA user_version`` and the
migration of stores written before fingerprints existed (`oodbench.storage.store` applies them).
"""

SCHEMA_VERSION = 5
# Schema 3 adds the cells' checkpoint (the short name of one checkpoint of a model entry that
# lists several; '' otherwise) and the per-image test scores of each cell, for bootstrap intervals.
# Schema 4 adds the cells' preprocessing: the test transform the model's images went through
# ('' for cells stored before it was recorded), which table captions name.
# Schema 5 adds the table of detectors under attack (`oodbench attack`); clean rows stay where they were.
ATTACKS_TABLE = """
CREATE TABLE IF NOT EXISTS attacks (
    benchmark TEXT NOT NULL, data_fingerprint TEXT NOT NULL, model TEXT NOT NULL, checkpoint TEXT NOT NULL,
    tags TEXT NOT NULL, postprocessor TEXT NOT NULL, setting TEXT NOT NULL, threat TEXT NOT NULL,
    threat_fingerprint TEXT NOT NULL, attack TEXT NOT NULL, eps REAL NOT NULL, gradient TEXT NOT NULL,
    fpr_convention TEXT NOT NULL, dataset TEXT NOT NULL, ood_group TEXT NOT NULL, metric TEXT NOT NULL,
    value REAL, created REAL,
    PRIMARY KEY (benchmark, data_fingerprint, model, checkpoint, postprocessor, setting, threat_fingerprint, attack,
                 eps, dataset, metric)
);
"""
ATTACK_COLUMNS = ("benchmark", "data_fingerprint", "model", "checkpoint", "tags", "postprocessor", "setting",
                  "threat", "threat_fingerprint", "attack", "eps", "gradient", "fpr_convention", "dataset",
                  "ood_group", "metric", "value", "created")
SCORES_TABLE = """
CREATE TABLE IF NOT EXISTS scores (
    fingerprint TEXT NOT NULL, dataset TEXT NOT NULL, count INTEGER NOT NULL, sha256 TEXT NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (fingerprint, dataset)
);
"""
SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    benchmark TEXT NOT NULL, model TEXT NOT NULL, postprocessor TEXT NOT NULL, setting TEXT NOT NULL,
    fingerprint TEXT NOT NULL, data_fingerprint TEXT,
    status TEXT NOT NULL, reason TEXT, params TEXT, tags TEXT,
    benchmark_version TEXT, oodbench_version TEXT, git_hash TEXT, config_hash TEXT,
    weights_hash TEXT, fpr_convention TEXT, search_limit INTEGER, seconds REAL, created REAL,
    checkpoint TEXT NOT NULL DEFAULT '', preprocessing TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (benchmark, model, postprocessor, setting, fingerprint)
);
CREATE TABLE IF NOT EXISTS results (
    benchmark TEXT NOT NULL, model TEXT NOT NULL, postprocessor TEXT NOT NULL, setting TEXT NOT NULL,
    fingerprint TEXT NOT NULL, dataset TEXT NOT NULL, ood_group TEXT NOT NULL, metric TEXT NOT NULL, value REAL,
    PRIMARY KEY (benchmark, model, postprocessor, setting, fingerprint, dataset, metric)
);
CREATE TABLE IF NOT EXISTS datasets (
    benchmark TEXT NOT NULL, model TEXT NOT NULL, data_fingerprint TEXT NOT NULL, dataset TEXT NOT NULL,
    ood_group TEXT NOT NULL, fingerprint TEXT, status TEXT NOT NULL, reason TEXT, samples INTEGER,
    available INTEGER, accuracy REAL, created REAL,
    PRIMARY KEY (benchmark, model, data_fingerprint, dataset)
);
""" + SCORES_TABLE + ATTACKS_TABLE
# Stores written before fingerprints existed: their rows are kept under fingerprint 'legacy',
# which no new cell has, so every cell is computed again beside them.
MIGRATE_V1 = """
ALTER TABLE cells RENAME TO cells_v1;
ALTER TABLE results RENAME TO results_v1;
ALTER TABLE datasets RENAME TO datasets_v1;
{schema}
INSERT INTO cells SELECT benchmark, model, postprocessor, setting, 'legacy', 'legacy', status, reason, params, tags,
    benchmark_version, oodbench_version, git_hash, config_hash, weights_hash, fpr_convention, NULL, seconds, created,
    '', '' FROM cells_v1;
INSERT INTO results SELECT benchmark, model, postprocessor, setting, 'legacy', dataset, ood_group, metric, value
    FROM results_v1;
INSERT INTO datasets SELECT benchmark, model, 'legacy', dataset, ood_group, NULL, status, reason, samples, samples,
    accuracy, NULL FROM datasets_v1;
DROP TABLE cells_v1;
DROP TABLE results_v1;
DROP TABLE datasets_v1;
"""
TABLES = ("cells", "results", "datasets", "attacks")
CELL_COLUMNS = ("benchmark", "model", "postprocessor", "setting", "fingerprint", "data_fingerprint", "status",
                "reason", "params", "tags", "benchmark_version", "oodbench_version", "git_hash", "config_hash",
                "weights_hash", "fpr_convention", "search_limit", "seconds", "created", "checkpoint", "preprocessing")
