"""Ontology settings, read from GMCO_ONTOLOGY_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gmco_common.config import ConfigError, ServerSettings, port_setting, setting

from gmco_ontology.loader import SAMPLE

PREFIX = "GMCO_ONTOLOGY_"


@dataclass(frozen=True)
class Settings(ServerSettings):
    port: int = port_setting(50053)
    backend: str = setting("embedded", help="where the graph lives", choices=("embedded", "neo4j"))
    file: Path = setting(SAMPLE, help="ontology YAML/JSON (embedded graph; seeds an empty Neo4j)")
    neo4j_uri: str = setting("", help="bolt:// or neo4j:// URI (backend=neo4j)")
    neo4j_user: str = setting("neo4j", help="Neo4j user")
    neo4j_password: str = setting("", help="Neo4j password")
    neo4j_database: str = setting("", help="Neo4j database (empty = the server default)")
    cache_size: int = setting(10_000, help="compiled filters kept in memory", check=lambda v: v > 0,
                              check_msg="must be > 0")
    reload_seconds: float = setting(5.0, help="how often to look for changes made by other replicas (neo4j)",
                                    check=lambda v: v > 0, check_msg="must be > 0")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend == "neo4j" and not self.neo4j_uri:
            raise ConfigError(f"{PREFIX}NEO4J_URI is required when {PREFIX}BACKEND=neo4j")
        if not self.file.is_file():
            raise ConfigError(f"{PREFIX}FILE={self.file} does not exist")

