"""Training input shared by every job: a ServerPool on the driver, crop batches on each worker."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from pydantic import Field, field_validator

from neuroray.config import RaySettings, StrictModel
from neuroray.errors import NeurorayError
from neuroray.paths import InputPath
from neuroray.platform.augment import PipelineSpec, build_pipeline, default_pipeline
from neuroray.platform.ingest import read_manifest
from neuroray.platform.sampler import CropDataset, SamplerConfig, build_sampler
from neuroray.platform.server import ServerPool


class DataSettings(StrictModel):
    """Layers to train on and how crops are served, sampled and augmented."""

    image: InputPath
    """Image layer URL (any format open_volume reads; ingest large volumes first)."""
    labels: InputPath | None = None
    """Aligned labels layer (segmentation ids or a binary mask), if the job needs one."""
    num_servers: int = Field(2, ge=1)
    cache_mb: float = Field(256, gt=0)
    server_cpus: float = Field(0, ge=0)
    """CPUs reserved per chunk server; 0 lets them share nodes with training workers."""
    server_resources: dict[str, float] = {}
    """Custom resources, e.g. {"chunk_server": 1} to place servers on CPU nodes of a cluster."""
    preload: bool = False
    sampler: SamplerConfig = SamplerConfig()
    augment: str | PipelineSpec = Field(default_factory=list)
    """A named list ("em", "lm", ...) or specs ([{name: flip, p: 0.5}, ...]); see augment.py."""
    crops_per_request: int = Field(8, ge=1)
    prefetch: int = Field(4, ge=1)

    @field_validator("augment")
    @classmethod
    def _known_list(cls, value: str | list) -> str | list:
        if isinstance(value, str):
            try:
                default_pipeline(value)
            except NeurorayError as err:
                raise ValueError(str(err)) from None
        return value

    def layers(self) -> dict[str, str]:
        return {"image": self.image, **({"labels": self.labels} if self.labels else {})}


def start_pool(data: DataSettings) -> ServerPool:
    """The chunk servers for a job (created by the driver, shared by all its workers)."""
    return ServerPool(
        data.layers(),
        num_servers=data.num_servers,
        cache_mb=data.cache_mb,
        preload=data.preload,
        num_cpus=data.server_cpus,
        resources=data.server_resources,
    )


def crop_batches(
    data: DataSettings,
    pool: ServerPool,
    *,
    rank: int,
    batch_size: int,
    steps_per_epoch: int,
    start_step: int,
) -> Iterator[dict[str, Any]]:
    """Endless batches of crops for one worker, positioned at ``start_step``.

    Epoch e of rank r always reads the same crops; a run resumed at step s skips exactly the
    ``(s mod steps_per_epoch) * batch_size`` samples it had consumed in that epoch.
    """
    from torch.utils.data import DataLoader

    manifest = (
        read_manifest(data.labels)
        if data.labels
        and data.sampler.foreground_from == "manifest"
        and data.sampler.min_foreground > 0
        else None
    )
    sampler = build_sampler(pool, data.sampler, manifest)
    dataset = CropDataset(
        pool,
        sampler,
        samples_per_epoch=steps_per_epoch * batch_size,
        rank=rank,
        crops_per_request=data.crops_per_request,
        prefetch=data.prefetch,
        augment=build_pipeline(data.augment) if data.augment else None,
    )
    epoch = start_step // steps_per_epoch
    dataset.load_state_dict(
        {"epoch": epoch, "consumed": (start_step % steps_per_epoch) * batch_size}
    )
    while True:
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=0)
        yield from loader
        epoch += 1
        dataset.set_epoch(epoch)


def check_crop_matches_model(
    data: DataSettings, img_size: tuple[int, ...] | None, key: str = "model.encoder.img_size"
) -> None:
    """Jobs crop exactly what the model was built for; say which two keys to set if not."""
    crop, size = tuple(data.sampler.crop_shape), tuple(img_size or ())
    if crop != size:
        raise ValueError(f"data.sampler.crop_shape {crop} must equal {key} {size} (set both)")


@contextlib.contextmanager
def chunk_servers(data: DataSettings, ray: RaySettings | None = None) -> Iterator[ServerPool]:
    """Connect to Ray as ``ray`` says (skipped when None: the caller has connected), start the
    chunk servers for ``data``, and shut them down when the block ends, however it ends::

        with chunk_servers(job.data, job.ray) as pool:
            fit(task_class, job, extras={"pool": pool})

    The one place a job's "connect, start the pool, shut it down" is written.
    """
    if ray is not None:
        from neuroray.runtime import connect_to

        connect_to(ray)
    with start_pool(data) as pool:
        yield pool


def run_with_pool(task_class: type, job: Any) -> Any:
    """Connect to Ray, start the job's chunk servers, fit ``task_class`` on them, stop them."""
    from neuroray.trainers.loop import fit
    from neuroray.trainers.run_dir import check_run_resume

    check_run_resume(job, task_class.__name__)  # before Ray starts
    with chunk_servers(job.data, job.ray) as pool:
        return fit(task_class, job, extras={"pool": pool})
