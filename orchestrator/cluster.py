"""The Ray cluster a command runs on: joined or started for the command (`ray_session`), the nodes
its Train workers may land on, storage they cannot all see (`check_cluster_storage`), and the
CPUs each worker asks for. How Ray itself is started and tuned lives in `orchestrator.ray_compat`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import ray

from orchestrator.config import Config
from orchestrator.errors import UserError
from orchestrator.ray_compat import ray_session_at, start_or_join_ray
from pipelines import storage


@contextmanager
def ray_session(cfg: Config) -> Iterator[bool]:
    """Ray for one command: joined or started (`init_ray`); what was started here is shut down and
    its temporary folder removed on the way out. Yields whether Ray was started here."""
    with ray_session_at(cfg.run.ray_address) as started:
        yield started


def init_ray(cfg: Config) -> tuple[bool, str | None]:
    """Join the configured Ray cluster (`run.ray_address`, else `RAY_ADDRESS`), or start a private
    local one; returns (started_here, temp_dir). See `orchestrator.ray_compat.start_or_join_ray`."""
    return start_or_join_ray(cfg.run.ray_address)


def spans_nodes(cfg: Config) -> int:
    """How many nodes this run's Train workers may land on, as far as the driver can tell: the
    alive nodes of the Ray cluster; 2 when there is one node but it lacks a GPU that the workers
    ask for (an autoscaling cluster, `cluster.yaml`, adds GPU nodes only once a job asks)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1 and cfg.scaling.use_gpu and not nodes[0].get("Resources", {}).get("GPU"):
        return 2
    return len(nodes)


def check_cluster_storage(cfg: Config, locations: dict[str, str], *, streams_data: bool) -> None:
    """Refuse, before training, local folders that Train workers on other nodes cannot see.

    Ray Train checks its storage from the workers and fails with "Unable to set up cluster storage"
    once the run is under way; Ray Data read tasks (`data.loader=stream`) and the rank-0 kNN probe
    read `data.path` on whatever node they run. A cluster of one node, a URI, or a local folder the
    user declared shared (`run.shared_filesystem`) passes.

    Args:
        locations: {"config field": location} that the workers write or read (a storage path).
        streams_data: the workers read `data.path` themselves (stream loader): it is checked too.

    Raises:
        UserError: one line naming the field and what to set.
    """
    if cfg.run.shared_filesystem:
        return
    fields = dict(locations)
    if streams_data:
        fields["data.path"] = cfg.data.path
    local = [(f, v) for f, v in fields.items() if not storage.is_uri(v)]
    if not local:
        return
    n = spans_nodes(cfg)
    if n <= 1:
        return
    field_name, value = local[0]
    raise UserError(f"{field_name} = {value!r} is a local folder, but this Ray cluster has {n} nodes whose Train "
                    f"workers cannot see it: set {field_name} to a URI that every node reaches (s3://BUCKET/..., "
                    "gs://...), or, if every node mounts that folder at the same path, set run.shared_filesystem=true")


def cpus_per_worker(cfg: Config) -> float:
    """`scaling.cpus_per_worker`, or 1 when the cluster has a CPU to spare for Ray Data, else a share."""
    if cfg.scaling.cpus_per_worker is not None:
        return cfg.scaling.cpus_per_worker
    total = float(ray.cluster_resources().get("CPU", 1.0))
    n = cfg.scaling.max_workers
    if total - n >= 1.0:
        return 1.0
    return max(0.1, round((total - 1.0) / n, 2))

