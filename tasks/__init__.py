"""Pipeline stages. Each module holds one stage: a pure core function of DataFrames and a thin Prefect task
edge that reads input artifacts, calls the core, and writes its outputs through the artifact store."""
