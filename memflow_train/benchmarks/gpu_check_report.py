"""gpu_check's report as Markdown: what ran, what each section timed or compared, one table per section."""

from __future__ import annotations

from memflow_train.benchmarks.streaming_fps import GOAL_FPS, PAPER_FPS


def _change(x: float | None) -> str:
    return "" if x is None else f"{x:+.1%}"


def markdown(report: dict) -> str:
    a = report["args"]
    head = [
        f"# GPU check: {report['device']}",
        "",
        f"torch {report['torch']}, preset {a['preset']} (all its blocks), {a['height']}x{a['width']} px, {a['dtype']}"
        + (" (--tiny: CPU sizes, one thread; the paper anchors do not apply)" if a["tiny"] else "")
        + f". Wall time {report['wall_s']:.0f} s (budget {a['budget_s']:.0f} s).",
        "",
        "Failed: " + ("; ".join(report["failed"]) if report["failed"] else "nothing"),
    ]
    s = report["sections"]
    parts = [head, _fps(s.get("fps", {})), _dmd(s.get("dmd", {})), _precision(s.get("precision", {}))]
    return "\n\n".join("\n".join(p) for p in parts) + "\n"


def _failed(section: dict) -> list[str]:
    return ["", f"Section failed: {section['error']}"] if section.get("error") else []


def _fps(f: dict) -> list[str]:
    out = ["## Streaming generation: transformer FPS"]
    if "rows" in f:
        last = f["warmup_chunks"] + f["measured_chunks"] - 1
        anchors = ", ".join(f"{k} {v} FPS" for k, v in PAPER_FPS.items())
        out += [
            "",
            f"Timed: {f['timed']}; chunks {f['warmup_chunks']} to {last} ({f['frames_per_chunk']} latent frames each), "
            f"after {f['warmup_chunks']} untimed warm-up chunks (SDPA) and one untimed chunk per case (compilation); "
            f"FPS = {f['fps_definition']}; {f['statistic']} of {f['repeats']} repeats. Not timed: noise draws, text encoding, "
            "VAE decoding.",
            "",
            f"Paper anchors (one H100, published, not measured here): {anchors}. Our goal: at least {GOAL_FPS} FPS "
            "with the memory on." + ("" if f["anchors_apply"] else " Neither applies to this run's sizes."),
            "",
            "| variant | backend | FPS | s/chunk | attended frames | bank frames | vs off | vs sdpa | first call s "
            "| paper anchor | goal met |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in f["rows"]:
            if r.get("unavailable"):
                out.append(f"| | {r['label']} | unavailable: {r['unavailable']} | | | | | | | | |")
            elif r["fps"] is None:
                out.append(f"| {r['variant']} | {r['label']} | error: {r['error']} | | | | | | | | |")
            else:
                goal = {None: "", True: "yes", False: "no"}[r["goal_met"]]
                out.append(
                    f"| {r['variant']} | {r['label']} | {r['fps']:.2f} | {r['seconds_per_chunk']:.4f} "
                    f"| {r['attended_frames']} | {r['bank_frames']} | {_change(r['vs_off'])} | {_change(r['vs_sdpa'])} "
                    f"| {r['first_call_seconds']:.2f} | {r['paper_anchor'] or ''} | {goal} |"
                )
    return out + _failed(f)


def _dmd(d: dict) -> list[str]:
    out = ["## Stage-1 DMD step"]
    if "steps" in d:
        p = d["planner"]
        estimate = f"{p['estimate_gib']:.3g}" if "estimate_gib" in p else p.get("unavailable") or p.get("error", "")
        ratio = f"{p['measured_over_estimate']:.2f}" if "measured_over_estimate" in p else ""
        repeats = ", ".join(f"{s['seconds']:.2f}" for s in d["steps"])
        out += [
            "",
            "One training step of a fresh SelfForcingDMD (global step 0: generator and critic losses, one backward, "
            "both networks' optimizer steps) under a Lightning Trainer, timed from batch start to batch end, "
            f"device-synchronised; {d['networks']}; memory {d['memory']}; {d['num_frames']} latent frames; gradient "
            f"checkpointing {'on' if d['gradient_checkpointing'] else 'off'}. Peak = what was resident when the step "
            "began (weights) + the peak of what the step created (activations, gradients, optimizer state).",
            "",
            "| s/step | steps (s) | peak GiB | resident GiB | planner estimate GiB | measured / estimate |",
            "|---|---|---|---|---|---|",
            f"| {d['seconds_per_step']:.2f} | {repeats} | {d['peak_gib']:.3g} | {d['steps'][0]['resident_gib']:.3g} "
            f"| {estimate} | {ratio} |",
        ]
    return out + _failed(d)


def _precision(p: dict) -> list[str]:
    out = [f"## Backbone {p.get('dtype', '')} against fp32"]
    if "cosine_similarity" in p:
        out += [
            "",
            f"{p['forward']} (latents {p['latent_shape']}, timestep {p['timestep']:.1f}), the same seeded weights and "
            f"input; reference {p['reference']}; errors relative to the fp32 output's RMS ({p['fp32_output_rms']:.3g}).",
            "",
            "| max abs error | max abs / RMS | RMS error / RMS | cosine similarity |",
            "|---|---|---|---|",
            f"| {p['max_abs_error']:.3g} | {p['max_abs_error_rel_rms']:.3g} | {p['rms_error_rel_rms']:.3g} "
            f"| {p['cosine_similarity']:.6f} |",
        ]
    return out + _failed(p)
