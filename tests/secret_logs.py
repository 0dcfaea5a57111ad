"""A compute log manager configured with secrets, as a remote log store would be.

Used by the secrets test: it puts secrets of every shape into dagster.yaml (and so into the instance
reference Dagster builds) without needing a database server. Its config is permissive: any extra
key is accepted and kept.
"""

from dagster import Permissive
from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager


class TokenComputeLogManager(LocalComputeLogManager):
    def __init__(self, base_dir, polling_timeout=None, inst_data=None, **secrets):
        self.secrets = secrets
        super().__init__(base_dir, polling_timeout, inst_data)

    @classmethod
    def config_type(cls):
        return Permissive(LocalComputeLogManager.config_type())

    @classmethod
    def from_config_value(cls, inst_data, config_value):
        return cls(inst_data=inst_data, **config_value)
