"""A compute log manager configured with a token, as a remote log store would be.

Used by the secrets test: it puts a secret into dagster.yaml, and so into the instance reference
Dagster builds, without needing a database server.
"""

from dagster import StringSource
from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager


class TokenComputeLogManager(LocalComputeLogManager):
    def __init__(self, base_dir, api_token, polling_timeout=None, inst_data=None):
        self.api_token = api_token
        super().__init__(base_dir, polling_timeout, inst_data)

    @classmethod
    def config_type(cls):
        return {**LocalComputeLogManager.config_type(), "api_token": StringSource}

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data=inst_data, **config_value)
