"""`capsule-batch model import|info`: make and inspect model bundles."""

from __future__ import annotations

from pathlib import Path

import click

from capsule_batch.cli.options import (
    check_writable_parent,
    emit_json,
    existing_path,
    json_option,
    output_path,
    overwrite_option,
    parse_key_values,
)


@click.group("model")
def command() -> None:
    """Import checkpoints into bundles and describe bundles."""


@command.command("import")
@click.argument("checkpoint", type=existing_path())
@click.option("--arch", required=True, help="timm architecture, e.g. eva02_base_patch14_224.")
@click.option("-o", "--output", "out", required=True, type=output_path(), help="Bundle folder to create.")
@click.option("--classes", default="ce24", show_default=True,
              help="Built-in class set (ce24) or a text file with one class name per line, in output order.")
@click.option("--normal-class", default="Normal", show_default=True,
              help="The class that means 'nothing to see' (frame score = 1 - p(normal)).")
@click.option("--norm", type=click.Choice(["imagenet", "timm"]), default=None,
              help="Input normalisation. Default: imagenet for the seed's Lightning checkpoints, "
                   "the arch's timm config otherwise.")
@click.option("--preprocess", "transform", type=click.Choice(["seed", "timm"]), default=None,
              help="Resize the weights were validated with. seed: whole frame to the input size, bicubic as "
                   "OpenCV's INTER_CUBIC, no antialiasing (the seed's infer.py); timm: the arch's eval transform "
                   "(shorter side, crop_pct, antialiased). Default: seed for the seed's Lightning checkpoints, "
                   "timm otherwise.")
@click.option("--field-of-view", type=click.Choice(["full", "fov"]), default="full", show_default=True,
              help="full: the whole frame (the seed's recipe); fov: crop each frame to the lens image first, only "
                   "for weights trained that way (docs/sources.md#field-of-view).")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="Extra timm.create_model argument (repeatable), e.g. depth=2.")
@overwrite_option
@json_option
def import_cmd(checkpoint: Path, arch: str, out: Path, classes: str, normal_class: str, norm: str | None,
               transform: str | None, field_of_view: str, model_args: tuple[str, ...], overwrite: bool,
               as_json: bool) -> None:
    """Import CHECKPOINT (seed Lightning .ckpt, timm state_dict or safetensors) into a bundle.

    The checkpoint is read without executing pickled code, and its tensors must fit ARCH exactly.
    """
    from capsule_batch.model.bundle import import_checkpoint
    from capsule_batch.model.classes import resolve_classes

    check_writable_parent(out)
    names = resolve_classes(classes)
    if normal_class not in names:
        raise click.BadParameter(f"{normal_class!r} is not one of the classes", param_hint="--normal-class")
    bundle = import_checkpoint(checkpoint, out, arch=arch, class_names=names, normal_class=normal_class,
                               model_args=parse_key_values(model_args, "--model-arg"), norm=norm,
                               transform=transform, field_of_view=field_of_view, overwrite=overwrite)
    if as_json:
        emit_json(bundle.info())
    else:
        fmt = bundle.provenance.get("source_format")
        click.echo(f"wrote {bundle.path} ({bundle.arch}, {bundle.num_classes} classes, from a {fmt} checkpoint)")
        click.echo(f"preprocess: {bundle.preprocess.describe()}")


@command.command("info")
@click.argument("bundle", type=existing_path())
@click.option("--verify", is_flag=True, help="Also hash the weights and build the model to prove they fit.")
@json_option
def info_cmd(bundle: Path, verify: bool, as_json: bool) -> None:
    """Describe BUNDLE: architecture, classes, preprocessing, thresholds, provenance."""
    from capsule_batch.model.bundle import ModelBundle

    b = ModelBundle.load(bundle)
    info = b.info()
    if verify:
        model = b.create_model(verify=True)
        info["parameters"] = sum(p.numel() for p in model.parameters())
        info["verified"] = True
    if as_json:
        emit_json(info)
        return
    p = b.preprocess
    lines = [
        f"bundle        {b.path}",
        f"arch          {b.arch}" + (f"  {b.model_args}" if b.model_args else ""),
        f"classes       {b.num_classes}: {', '.join(b.class_names)}",
        f"normal class  {b.normal_class}",
        f"preprocess    {p.describe()}",
        "thresholds    " + (", ".join(f"{k} {v:.3f}" for k, v in b.thresholds.items()) if b.thresholds
                            else "none (flag argmax != normal class)"),
        f"weights       {info['weights_bytes'] / 1e6:.1f} MB, sha256 {b.weights_sha256}",
    ]
    if "parameters" in info:
        lines.append(f"parameters    {info['parameters']:,} (weights verified)")
    for k, v in b.provenance.items():
        lines.append(f"  {k:<12}{v}")
    click.echo("\n".join(lines))
