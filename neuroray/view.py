"""``neuroray view``: look at layers and segmentation outputs in Neuroglancer, offline.

The ``neuroglancer`` Python package serves its bundled web client and the viewer state from
127.0.0.1 (no internet needed). Local precomputed layers are served as they are on disk over a
CORS-enabled HTTP server (Neuroglancer then reads their own scales and meshes); every other
format (zarr / OME-Zarr, HDF5, TIFF, npy, and zarr in buckets) is read through
:func:`~neuroray.platform.volume.open_volume` and served as a ``LocalVolume``. Every layer gets
its voxel size (nm) explicitly, segmentation layers are segmentation layers, and the view opens
at the centre of the first layer.

A ``neuroray segment`` output folder stands for its layers: the image it was made from, the
affinities or probabilities, and the segmentation. ``--screenshot`` renders the view in Debian's
headless Chromium (through Selenium and neuroglancer's webdriver), writes the PNG and the
Neuroglancer state it shows (``.json`` beside it), and exits.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from neuroray.errors import NeurorayError
from neuroray.paths import local_file
from neuroray.platform.box import Box
from neuroray.platform.volume import Volume, open_volume

#: Volumes up to this size are read into memory, so Neuroglancer can mesh their objects in 3D.
IN_MEMORY_BYTES = 256 * 2**20
#: Objects shown in 3D at most (the biggest ones).
MAX_OBJECTS_IN_3D = 100
SEGMENT_OUTPUT_LAYERS = ("affinities", "probabilities", "segmentation")
CHROMIUM_HELP = (
    "install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
)


def view_command(*targets: str | os.PathLike[str]) -> str:
    """The shell command that shows ``targets`` (printed by the commands that write layers)."""
    return shlex.join(["neuroray", "view", *(_absolute(str(t)) for t in targets)])


def _absolute(target: str) -> str:
    path = local_file(target)
    if path is None or target.startswith(("precomputed://", "zarr://", "file://")):
        return target
    return str(path.resolve()) + (f"#{target.partition('#')[2]}" if "#" in target else "")


# ---------------------------------------------------------------------- what to show
@dataclass
class ViewLayer:
    """One layer to show: its name in the viewer, the URL it came from, and the open volume."""

    name: str
    url: str
    volume: Volume

    @property
    def is_segmentation(self) -> bool:
        return self.volume.layer_type == "segmentation"


def segment_output_layers(folder: Path) -> list[str]:
    """The layers of a ``neuroray segment`` output: its image (recorded in the output's
    fingerprint), its affinities or probabilities, and its segmentation, in that order."""
    from neuroray.platform.provenance import local_dir, read_fingerprint

    urls = []
    fingerprint = read_fingerprint(local_dir(folder)) or {}
    source = (fingerprint.get("predict") or {}).get("image") or {}
    image = source.get("url") or source.get("path")
    if image and source.get("key"):
        image = f"{image}#{source['key']}"
    if image and (local_file(image) is None or local_file(image).exists()):
        urls.append(image)
    external = (fingerprint.get("segment") or {}).get("affinities") or {}
    if external.get("path") or external.get("url"):
        urls.append(external.get("url") or external["path"])
    urls += [
        str(folder / name) for name in SEGMENT_OUTPUT_LAYERS if (folder / name / "info").exists()
    ]
    return urls


def is_segment_output(path: Path) -> bool:
    return (path / ".neuroray" / "blockwise").is_dir() and (path / "segmentation").is_dir()


def resolve_layers(targets: Sequence[str]) -> list[ViewLayer]:
    """Open every target (a layer URL or a segment output folder); names are made unique."""
    if not targets:
        raise NeurorayError("give at least one layer or segment output folder to view")
    urls: list[str] = []
    for target in targets:
        path = local_file(target)
        if path is not None and not path.exists():
            raise NeurorayError(f"nothing to view at {target}: the path does not exist")
        urls += (
            segment_output_layers(path)
            if path is not None and is_segment_output(path)
            else [target]
        )
    layers: list[ViewLayer] = []
    taken: set[str] = set()
    for url in urls:
        volume = open_volume(url)
        name = _layer_name(url)
        unique, n = name, 2
        while unique in taken:
            unique, n = f"{name}_{n}", n + 1
        taken.add(unique)
        layers.append(ViewLayer(unique, url, volume))
    return layers


def _layer_name(url: str) -> str:
    path, _, key = url.partition("#")
    if key:
        return key.strip("/").replace("/", "_")
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".zarr", ".h5", ".hdf5", ".tif", ".tiff", ".npy"):
        name = name.removesuffix(suffix)
    return name or "layer"


# ---------------------------------------------------------------------- serving
def _file_server_class() -> type:
    """neuroglancer's CORS static file server, taught CloudVolume's on-disk gzip: a chunk it
    stores as ``NAME.gz`` is what Neuroglancer asks for as ``NAME`` (Content-Encoding: gzip)."""
    import neuroglancer.random_token
    import neuroglancer.server
    import tornado.httpserver
    import tornado.netutil
    import tornado.web
    from neuroglancer.static_file_server import CorsStaticFileHandler, StaticFileServer

    class GzipAwareHandler(CorsStaticFileHandler):
        @classmethod
        def get_absolute_path(cls, root: str, path: str) -> str:
            absolute = super().get_absolute_path(root, path)
            if not os.path.exists(absolute) and os.path.exists(absolute + ".gz"):
                return absolute + ".gz"
            return absolute

        def set_extra_headers(self, path: str) -> None:
            if str(self.absolute_path).endswith(".gz") and not path.endswith(".gz"):
                self.set_header("Content-Encoding", "gzip")

        def get_content_type(self) -> str:
            return "application/json" if self.path.endswith("info") else "application/octet-stream"

    class LayerFileServer(StaticFileServer):
        def _attempt_to_start_server(self) -> None:  # as the parent's, with the handler above
            token = neuroglancer.random_token.make_random_token()
            handlers = [(rf"/{token}/(.*)", GzipAwareHandler, {"path": self.static_dir})]
            self.app = tornado.web.Application(handlers)
            self.http_server = tornado.httpserver.HTTPServer(self.app)
            sockets = tornado.netutil.bind_sockets(port=0, address=self.bind_address)
            self.http_server.add_sockets(sockets)
            port = sockets[0].getsockname()[1]
            self.url = f"{neuroglancer.server._get_server_url(self.bind_address, port)}/{token}"

    return LayerFileServer


class _VolumeArray:
    """A :class:`Volume` as the numpy-like array neuroglancer's LocalVolume reads from
    (C, z, y, x for multi-channel layers), without loading it."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        channels = (volume.num_channels,) if volume.num_channels > 1 else ()
        self.shape = (*channels, *volume.shape)
        self.dtype = volume.dtype
        self.ndim = len(self.shape)

    def __getitem__(self, key: tuple[slice, ...]) -> np.ndarray:
        spatial = key[-3:]
        data = self.volume[spatial]
        return data[key[0]] if self.volume.num_channels > 1 else data


@dataclass
class View:
    """A running viewer: its URL, the layers it shows, and the servers to stop."""

    viewer: Any
    layers: list[ViewLayer]
    file_servers: list[Any]

    @property
    def url(self) -> str:
        return self.viewer.get_viewer_url()

    def stop(self) -> None:
        for server in self.file_servers:
            server.stop()
        import neuroglancer

        neuroglancer.stop()


def _dimensions(voxel_size: Sequence[float], order: str, num_channels: int = 1) -> Any:
    """A CoordinateSpace with ``voxel_size`` (nm, z, y, x), axes in ``order`` ("xyz" or "zyx"),
    plus Neuroglancer's channel dimension ``c^`` first (zyx) or last (xyz) for multi-channel."""
    import neuroglancer

    size = dict(zip("zyx", voxel_size, strict=True))
    names, units, scales = list(order), ["nm"] * 3, [size[a] for a in order]
    if num_channels > 1:
        at = 0 if order == "zyx" else 3
        names.insert(at, "c^")
        units.insert(at, "")
        scales.insert(at, 1.0)
    return neuroglancer.CoordinateSpace(names=names, units=units, scales=scales)


def _shader(layer: ViewLayer) -> str | None:
    channels = layer.volume.num_channels
    if layer.is_segmentation or channels == 1:
        return None
    values = [f"toNormalized(getDataValue({c}))" for c in range(min(channels, 3))]
    values += ["0.0"] * (3 - len(values))
    return f"void main() {{ emitRGB(vec3({', '.join(values)})); }}"


def _contrast(volume: Volume) -> tuple[float, float] | None:
    """A display range from a crop at the centre (1st-99th percentile), for non-uint8 images."""
    if volume.dtype == np.uint8:
        return None
    centre = [s // 2 for s in volume.shape]
    box = Box(
        [centre[0], max(0, centre[1] - 128), max(0, centre[2] - 128)],
        [
            centre[0] + 1,
            min(volume.shape[1], centre[1] + 128),
            min(volume.shape[2], centre[2] + 128),
        ],
    )
    sample = np.asarray(volume.read(box), dtype=np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return None
    low, high = np.percentile(sample, [1, 99])
    return (float(low), float(high)) if high > low else None


def _source(layer: ViewLayer, file_servers: list[Any], bind: str) -> tuple[Any, np.ndarray | None]:
    """Neuroglancer's data source for one layer (see the module docstring), and the layer's
    voxels when they were read into memory."""
    import neuroglancer

    volume = layer.volume
    if volume.format_name == "precomputed":
        path = local_file(layer.url)
        if path is None:  # a bucket: Neuroglancer reads it itself
            url = (
                layer.url
                if layer.url.startswith("precomputed://")
                else f"precomputed://{layer.url}"
            )
        else:
            server = _file_server_class()(str(path.resolve()), bind_address=bind, daemon=True)
            file_servers.append(server)
            url = f"precomputed://{server.url}"
        source = neuroglancer.LayerDataSource(
            url=url,
            transform=neuroglancer.CoordinateSpaceTransform(
                output_dimensions=_dimensions(volume.voxel_size, "xyz", volume.num_channels)
            ),
        )
        return source, None
    in_memory = None
    if volume.nbytes <= IN_MEMORY_BYTES:  # in memory: fast, and LocalVolume meshes objects
        in_memory = np.asarray(volume[:])
    source = neuroglancer.LocalVolume(
        data=_VolumeArray(volume) if in_memory is None else in_memory,
        dimensions=_dimensions(volume.voxel_size, "zyx", volume.num_channels),
        volume_type="segmentation" if layer.is_segmentation else "image",
    )
    return source, in_memory


def _objects_to_show(
    layer: ViewLayer, data: np.ndarray | None, most: int = MAX_OBJECTS_IN_3D
) -> list[int]:
    """Objects to show in 3D: those with precomputed meshes (``segment --mesh``), or the
    largest of an in-memory layer ``data`` (Neuroglancer meshes those itself); at most ``most``."""
    if data is not None:
        ids, counts = np.unique(data, return_counts=True)
        keep = ids != 0
        ids, counts = ids[keep], counts[keep]
        return [int(i) for i in ids[np.argsort(counts)[::-1][:most]]]
    path = local_file(layer.url)
    if layer.volume.format_name != "precomputed" or path is None:
        return []
    info = json.loads((path / "info").read_text())
    mesh_dir = path / str(info.get("mesh", ""))
    if "mesh" not in info or not mesh_dir.is_dir():
        return []
    fragments: dict[int, int] = {}
    for entry in os.scandir(mesh_dir):  # ID:0:BOUNDS(.gz) per piece, ID:0 the manifest
        head, _, rest = entry.name.partition(":")
        if head.isdigit() and rest.startswith("0:"):
            fragments[int(head)] = fragments.get(int(head), 0) + 1
    return sorted(fragments, key=lambda i: -fragments[i])[:most]


#: Panel side (pixels) the first slice is fitted to when the window size is unknown.
PANEL_PX = 450


def panel_px(size: tuple[int, int], layout: str) -> int:
    """The shorter side, in pixels, of one slice panel of a ``size`` (width, height) window in
    ``layout``: a 2 x 2 grid for ``4panel``, side by side for ``xy-3d``, the window otherwise."""
    width, height = size
    if layout == "4panel":
        width, height = width // 2, height // 2
    elif layout == "xy-3d":
        width //= 2
    return max(1, min(width, height))


def serve(
    layers: Sequence[ViewLayer],
    *,
    bind: str = "127.0.0.1",
    port: int = 0,
    layout: str = "4panel",
    panel: int = PANEL_PX,
) -> View:
    """Start neuroglancer's server on ``bind:port`` showing ``layers``; returns the running view.
    The first layer's slice fits a ``panel``-pixel square (:func:`panel_px` for a known size)."""
    import neuroglancer

    neuroglancer.set_server_bind_address(bind, port)
    viewer = neuroglancer.Viewer()
    file_servers: list[Any] = []
    first = layers[0].volume
    with viewer.txn() as state:
        state.dimensions = _dimensions(first.voxel_size, "xyz")
        state.position = [s / 2 for s in first.shape[::-1]]  # x, y, z voxels: the centre
        state.cross_section_scale = max(first.shape[1:]) / panel  # the slice fits a panel
        state.projection_scale = 1.5 * max(first.shape[1:])
        state.layout = layout
        for layer in layers:
            source, in_memory = _source(layer, file_servers, bind)
            if layer.is_segmentation:
                segmentation = neuroglancer.SegmentationLayer(source=source)
                objects = _objects_to_show(layer, in_memory)
                if objects:  # shown in 3D; every object stays visible in the slices
                    segmentation.segments = objects
                    segmentation.not_selected_alpha = segmentation.selected_alpha
                state.layers[layer.name] = segmentation
                continue
            image = neuroglancer.ImageLayer(source=source)
            shader = _shader(layer)
            if shader:
                image.shader = shader
            contrast = _contrast(layer.volume) if shader is None else None
            if contrast is not None:
                image.shader_controls = {"normalized": {"range": list(contrast)}}
            state.layers[layer.name] = image
    return View(viewer, list(layers), file_servers)


# ---------------------------------------------------------------------- screenshots
def find_chromium() -> tuple[str, str]:
    """Paths of Chromium and its chromedriver, or a NeurorayError saying how to install them."""
    browser = next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p),
        None,
    )
    driver = os.environ.get("SE_CHROMEDRIVER") or shutil.which("chromedriver")
    if browser is None or driver is None:
        missing = "chromium" if browser is None else "chromedriver"
        raise NeurorayError(
            f"--screenshot needs a headless browser ({missing} not found): {CHROMIUM_HELP}"
        )
    return browser, driver


def screenshot(
    view: View,
    png: str | os.PathLike[str],
    *,
    size: tuple[int, int] = (1280, 960),
    timeout_s: float = 180.0,
) -> dict[str, Any]:
    """Render ``view`` in headless Chromium once every visible chunk has loaded and write it to
    ``png``; returns the viewer state the browser rendered (JSON)."""
    from neuroglancer.webdriver import Webdriver

    browser, driver = find_chromium()
    os.environ["SE_CHROMEDRIVER"] = driver  # Selenium uses it as is: no driver download
    args = [
        "--enable-unsafe-swiftshader",  # WebGL on the CPU: no GPU needed
        "--use-angle=swiftshader",
        "--disable-gpu-sandbox",
        "--no-first-run",
    ]
    with Webdriver(
        view.viewer,
        headless=True,
        docker=True,  # --no-sandbox etc.: root and containers
        browser_binary_path=browser,
        print_logs=False,
        extra_command_line_args=args,
    ):
        reply = _screenshot_within(view.viewer, size, timeout_s)
    _write_png(reply.screenshot.image, Path(png))
    return reply.viewer_state.to_json()


def _write_png(image: bytes, png: Path) -> None:
    """Chromium's PNG re-encoded smaller: without its alpha channel when every pixel is
    opaque (Neuroglancer's always are), and optimised (about 30% smaller for EM)."""
    import io

    from PIL import Image

    picture = Image.open(io.BytesIO(image))
    if picture.mode == "RGBA" and picture.getchannel("A").getextrema() == (255, 255):
        picture = picture.convert("RGB")
    png.parent.mkdir(parents=True, exist_ok=True)
    picture.save(png, format="PNG", optimize=True)


def _screenshot_within(viewer: Any, size: tuple[int, int], timeout_s: float) -> Any:
    """``viewer.screenshot`` (which waits without limit) with a deadline."""
    result: list[Any] = []
    failure: list[BaseException] = []

    def take() -> None:
        try:
            result.append(viewer.screenshot(size=list(size)))
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
            failure.append(err)

    thread = threading.Thread(target=take, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(timeout_s)
    if failure:
        raise failure[0]
    if not result:
        raise NeurorayError(
            f"the view did not finish rendering within {timeout_s:.0f} s "
            f"({time.monotonic() - started:.0f} s waited); is WebGL available to Chromium?"
        )
    return result[0]


# ---------------------------------------------------------------------- the command
def run_view(
    targets: Sequence[str],
    *,
    bind: str = "127.0.0.1",
    port: int = 0,
    screenshot_png: str | None = None,
    size: tuple[int, int] = (1280, 960),
    layout: str = "4panel",
    timeout_s: float = 180.0,
    out: Any = print,
) -> None:
    """``neuroray view``: serve until Ctrl-C, or write one screenshot and exit."""
    layers = resolve_layers(targets)  # every input error before any server starts
    if screenshot_png is not None:
        find_chromium()
    panel = panel_px(size, layout) if screenshot_png is not None else PANEL_PX
    view = serve(layers, bind=bind, port=port, layout=layout, panel=panel)
    try:
        for layer in layers:
            volume = layer.volume
            out(
                f"{layer.name}: {layer.url} ({volume.layer_type}, {volume.format_name}, "
                f"shape z,y,x {list(volume.shape)}, voxel {list(volume.voxel_size)} nm)"
            )
        if screenshot_png is not None:
            state = screenshot(view, screenshot_png, size=size, timeout_s=timeout_s)
            state_json = Path(screenshot_png).with_suffix(".json")
            state_json.write_text(json.dumps(state, indent=1))
            out(f"screenshot: {screenshot_png} (its Neuroglancer state: {state_json})")
            return
        out(f"Neuroglancer: {view.url}")
        out("serving on this machine only; press Ctrl-C to stop")
        _wait_forever()
    finally:
        view.stop()


def _wait_forever() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
