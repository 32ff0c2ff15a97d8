"""Running a job: executor, retry policy, gateway (the only openai importer), limits."""
