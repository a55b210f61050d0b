"""`capsule-batch env`: versions, devices, and which sources and backends are usable here."""

from __future__ import annotations

import click

from capsule_batch.cli.options import emit_json, json_option


@click.command("env")
@json_option
def command(as_json: bool) -> None:
    """Show package versions, devices, and which sources/backends work here (and why not)."""
    from capsule_batch.run.environment import environment_report

    rep = environment_report()
    if as_json:
        emit_json(rep)
        return
    lines = [f"capsule-batch {rep['capsule_batch']}  Python {rep['python']}  {rep['platform']}", "", "packages:"]
    for p in rep["packages"]:
        state = p["version"] or "not installed"
        if p["version"] and not p["importable"]:
            state += f"  (import fails: {p.get('error', '')})"
        lines.append(f"  {p['package']:<12} {state:<24} {p['purpose']}")
    dev = rep["devices"]
    lines += ["", f"devices: torch CUDA build {dev['torch_cuda_build']}, CUDA available: {dev['cuda_available']}, "
                  f"{dev['cpu_threads']} CPU threads"]
    cpu = dev["cpu"]
    lines.append(f"  cpu: {cpu['model']} ({cpu['cores']} cores; {' '.join(cpu['flags']) or 'no recorded flags'})")
    if dev["cpu_choice_forced"]:
        lines.append(f"  CAPSULE_BATCH_CPU_CHOICE={dev['cpu_choice_forced']}: `auto` on this CPU is forced to it, "
                     "unmeasured")
    for g in dev["gpus"]:
        lines.append(f"  cuda:{g['index']} {g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)")
    gv = rep["gpu_verification"]
    lines += ["", "GPU code verified (docs/gpu.md):", f"  on a real GPU: {gv['real_gpu']}",
              f"  on a fake CUDA device: {gv['fake_cuda']}"]
    for kind in ("sources", "backends"):
        lines += ["", f"{kind}:"]
        if not rep[kind]:
            lines.append("  (none registered)")
        for r in rep[kind]:
            lines.append(f"  {r['name']:<12} {'yes' if r['available'] else 'no':<4} {r['reason']}")
    click.echo("\n".join(lines))
