"""`tele image build|push`: tele's container image, built without docker, pushed to a registry."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tele.cli.output import OUTPUT_CHOICES, emit

format_option = click.option(
    "--output",
    "output",
    type=click.Choice(OUTPUT_CHOICES),
    default="default",
    show_default=True,
    help="Print as text for people or as json/yaml for programs.",
)


@click.group()
def image() -> None:
    """Build tele's image (manager, agent and agent-init in one) and push it to a registry."""


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@image.command()
@click.option(
    "-o",
    "--archive",
    "archive",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the image as a tar that docker/podman load, kind load image-archive and "
    "k3d image import accept.",
)
@click.option(
    "--sandbox",
    "with_sandbox",
    is_flag=True,
    help="Also build the sandbox's images (echo, worker, ...), as `tele sandbox up` does.",
)
@format_option
def build(archive: Path | None, with_sandbox: bool, output: str) -> None:
    """Build tele's image (cached by its inputs) and print its digest, size and layers."""
    from tele.image.archive import write_archive
    from tele.image.build import build_sandbox_images, build_tele_image

    if archive is not None and archive.name in ("json", "yaml") and not archive.suffix:
        # Everywhere else -o is the output format: `tele image build -o json` would otherwise
        # write an archive named "json".
        raise click.UsageError(
            f"-o names the archive file here (-o FILE.tar); for {archive.name} output use "
            f"--output {archive.name}."
        )
    if sys.stderr.isatty() and output == "default":
        click.echo("Building tele's image (the first build takes about a minute)...", err=True)
    result = build_tele_image()
    images = [(result.image, result.tag)]
    sandbox = build_sandbox_images() if with_sandbox else {}
    images += [(r.image, r.tag) for r in sandbox.values()]
    if archive is not None:
        write_archive(archive, images)
    data = {
        **result.to_json(),
        "archive": str(archive) if archive else None,
        "sandbox": [r.to_json() for r in sandbox.values()],
    }

    def text(_: object) -> str:
        lines = [
            f"Image {result.tag}"
            + (" (cached)" if result.cached else f" built in {result.seconds:.1f} s"),
            f"  digest: {result.image.digest}",
            f"  size:   {_size(result.image.size)} compressed",
        ]
        for layer in result.layers:
            state = "cached" if layer.cached else f"built in {layer.seconds:.1f} s"
            lines.append(f"  layer {layer.name:5} {_size(layer.layer.size):>9}  {state}")
        for r in sandbox.values():
            lines.append(f"Image {r.tag}: {r.image.digest} ({_size(r.image.size)})")
        if archive is not None:
            lines.append(f"  archive: {archive}")
        return "\n".join(lines)

    emit(data, output, text)


@image.command()
@click.argument("target")
@click.option(
    "--ca-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A CA certificate (PEM) to trust for the registry, beside the system's.",
)
@click.option(
    "--insecure", is_flag=True, help="Do not verify the registry's certificate (or use HTTP)."
)
@format_option
def push(target: str, ca_file: Path | None, insecure: bool, output: str) -> None:
    """Build tele's image if needed and push it as TARGET (REGISTRY/REPOSITORY[:TAG]).

    Credentials come from the docker config (~/.docker/config.json or $DOCKER_CONFIG), as
    `docker login` writes them. The tag defaults to tele's version.
    """
    import trio

    from tele.image.build import build_tele_image
    from tele.image.credentials import credentials_from_docker_config
    from tele.image.oci import Descriptor
    from tele.image.reference import parse_reference
    from tele.image.registry import RegistryClient

    ref = parse_reference(target)
    if ref.digest is not None:
        raise click.UsageError("Push to a tag, not a digest (REGISTRY/REPOSITORY[:TAG]).")
    result = build_tele_image()
    if ref.tag is None:
        ref = ref.with_tag(result.tag.rsplit(":", 1)[1])
    credentials = credentials_from_docker_config(None, ref.registry)
    uploaded: list[int] = []
    show = sys.stderr.isatty() and output == "default"

    def on_blob(descriptor: Descriptor, sent: bool) -> None:
        if sent:
            uploaded.append(descriptor.size)
        if show:
            state = "uploaded" if sent else "already there"
            click.echo(
                f"  {descriptor.digest[:19]}  {_size(descriptor.size):>9}  {state}", err=True
            )

    async def run() -> str:
        async with RegistryClient(
            ref.registry, credentials=credentials, ca_file=ca_file, insecure=insecure
        ) as client:
            return await client.push_image(
                ref,
                result.image.manifest_bytes,
                result.image.blobs(),
                on_blob=on_blob,
            )

    digest = trio.run(run)
    data = {
        "image": str(ref),
        "digest": digest,
        "uploaded_bytes": sum(uploaded),
        "uploaded_blobs": len(uploaded),
    }

    def text(_: object) -> str:
        sent = (
            f"{len(uploaded)} blobs, {_size(sum(uploaded))} uploaded"
            if uploaded
            else "every blob was already there"
        )
        return f"Pushed {ref.familiar} ({sent})\n  digest: {digest}"

    emit(data, output, text)
