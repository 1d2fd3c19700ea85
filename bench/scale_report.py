"""bench.scale's derived figures and table: commit rate, driver growth per shard, the manifest's rewrite cost, the
headline numbers (pipeline vs bare loop, memory, spilling, files, resume), thinned timelines, the printed table."""
from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path


def commit_rate(lines: list[dict], per_shard: int) -> dict:
    """From a job's progress lines (``{"t": s since start, "line": text}``, "[i/n] committed …"): commits seen,
    first/last commit time in s and the steady rate between them in images per second (start-up excluded;
    ``per_shard`` images a commit)."""
    times = [entry["t"] for entry in lines if "] committed " in entry["line"]]
    if not times:
        return {"commits_seen": 0}
    later = [t for t in times if t - times[0] > 0.2]  # commits come in bursts (a write part holds several shards)
    span = times[-1] - times[0]
    return {"commits_seen": len(times), "first_commit_s": times[0], "last_commit_s": times[-1],
            "steady_images_per_second": round(len(later) * per_shard / span, 2) if later else None}


def driver_growth(timeline: list[dict], shards: int) -> dict:
    """Driver RSS (bytes) against committed shards: least squares over the ``timeline`` samples with at least one
    commit; the RSS at the first commit and the last sample, the slope in bytes per committed shard and the RSS it
    extrapolates to at 10,000 shards ({} with fewer than 3 samples or 2 commit counts). ``shards`` is unused."""
    points = [(p["commits"], p["driver_rss"]) for p in timeline if p["commits"] > 0 and p["driver_rss"]]
    if len(points) < 3 or len({c for c, _ in points}) < 2:
        return {}
    n = len(points)
    mx, my = sum(c for c, _ in points) / n, sum(r for _, r in points) / n
    slope = sum((c - mx) * (r - my) for c, r in points) / sum((c - mx) ** 2 for c, _ in points)
    first = next(r for c, r in points)
    return {"driver_rss_at_first_commit": first, "driver_rss_at_last_sample": points[-1][1],
            "bytes_per_committed_shard": round(slope), "extrapolated_10000_shards_bytes": round(my + slope *
                                                                                               (10000 - mx))}


def manifest_cost(out: Path, shards: int, wall_seconds: float) -> dict:
    """What rewriting manifest.json costs a run of ``shards`` shards lasting ``wall_seconds``: the final manifest's
    size and the time to serialise + write it once (measured here), times the rewrites jobs.scaffold.ShardedRun
    makes (start, at most one per MANIFEST_INTERVAL_S while shards commit, loop end, finish; each about as large
    as the final one at most). Bytes and seconds; {} without a manifest under ``out``."""
    from jobs.scaffold import MANIFEST_INTERVAL_S
    from workers.sink import OutputStore

    path = out / "manifest.json"
    if not path.exists():
        return {}
    manifest = json.loads(path.read_text())
    store = OutputStore(str(out / "_manifest_probe"))
    start = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        store.write_json("manifest.json", manifest)
    once = (time.perf_counter() - start) / repeats
    shutil.rmtree(out / "_manifest_probe", ignore_errors=True)
    size = path.stat().st_size
    rewrites = min(shards, int(wall_seconds // MANIFEST_INTERVAL_S)) + 3
    return {"manifest_bytes": size, "write_seconds_once": round(once, 5),
            "rewrites_per_run": rewrites, "bytes_written_by_rewrites_est": round(size * rewrites),
            "seconds_in_rewrites_est": round(once * rewrites, 3)}



def headline(pipeline: dict, evaluate: dict, killed: dict, resumed: dict, resume_check: dict, bare_runs: list[dict],
             per_shard: int) -> dict:
    """The headline numbers from :func:`bench.scale_monitor.run_job`'s results (``pipeline`` and ``evaluate`` with
    their summary, commit rate, files and check; the ``killed`` run with ``commits_after_kill``; the ``resumed``
    one), the resumed output's :func:`bench.scale_data.verify` report and the bare loop's runs: images per second
    (pipeline, steady, bare at 1 thread and best) and their ratios, CPU ms per image and the bare / pipeline CPU
    ratio, the other processes' share of the machine's CPU, peak RSS in bytes (driver, Ray, this process), spilled
    bytes, files and bytes written, bytes per map, evaluate's rate, the kill and the resume (seconds, first commit
    after s, images recomputed, Ray processes left), and whether every rows check passed."""
    bare_actor = next(r for r in bare_runs if r["threads"] == 1)
    bare_best = max(bare_runs, key=lambda r: r["images_per_second"])
    summary = pipeline["summary"] or {}
    ips = summary.get("images_per_second") or 0.0
    images_done = summary.get("samples") or 0
    steady = pipeline["commit_rate"].get("steady_images_per_second")
    attributions = pipeline["files"]["by_kind"].get("attributions", {"files": 0, "bytes": 0})
    rows = pipeline["check"]["rows"]
    return {
        "pipeline_images_per_second": ips,
        "pipeline_steady_images_per_second": steady,
        "bare_images_per_second": bare_actor["images_per_second"],
        "bare_best_images_per_second": bare_best["images_per_second"],
        "ratio_to_bare": round(ips / bare_actor["images_per_second"], 3) if ips else 0.0,
        "steady_ratio_to_bare": round(steady / bare_actor["images_per_second"], 3) if steady else None,
        "ratio_to_best_bare": round(ips / bare_best["images_per_second"], 3) if ips else 0.0,
        "pipeline_cpu_ms_per_image": round(1000 * pipeline["cpu"]["job_cpu_seconds"] / images_done, 3)
        if images_done else None,
        "bare_cpu_ms_per_image": bare_actor["cpu_ms_per_image"],
        "cpu_ratio_bare_to_pipeline": round(bare_actor["cpu_ms_per_image"] * images_done
                                            / (1000 * pipeline["cpu"]["job_cpu_seconds"]), 3)
        if images_done and pipeline["cpu"]["job_cpu_seconds"] else None,
        "other_processes_cpu_share": round(pipeline["cpu"]["other_processes_cpu_seconds"]
                                           / pipeline["cpu"]["machine_cpu_seconds_available"], 3),
        "driver_peak_rss_bytes": pipeline["driver_peak_rss_bytes"],
        "ray_peak_rss_bytes": pipeline["ray_peak_rss_bytes"],
        "bench_process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "spilled_bytes": max(pipeline["spilling"]["spill_dir_peak_bytes"],
                             pipeline["spilling"]["raylet_spilled_mib"] * 2**20),
        "files_written": pipeline["files"]["files"], "bytes_written": pipeline["files"]["bytes"],
        "attribution_files": attributions["files"],
        "bytes_per_map": round(attributions["bytes"] / rows, 1) if rows else None,
        "evaluate_images_per_second": (evaluate["summary"] or {}).get("images_per_second"),
        "killed_at_commits": killed["commits_after_kill"], "resume_seconds": resumed["wall_seconds"],
        "resume_first_commit_seconds": commit_rate(resumed["lines"], per_shard).get("first_commit_s"),
        "ray_processes_left_after_kill": ((killed.get("killed") or {}).get("left_behind") or {})
        .get("killed_after_grace"),
        "resume_images": (resumed["summary"] or {}).get("samples"),
        "resume_ok": resume_check["ok"], "pipeline_ok": pipeline["check"]["ok"],
        "evaluate_ok": evaluate["check"]["ok"],
    }


def thin(timeline: list[dict], points: int = 120) -> list[dict]:
    """Every n-th sample of ``timeline`` (n = len // ``points``, at least 1), about ``points`` of them, and the last."""
    step = max(1, len(timeline) // points)
    return timeline[::step] + (timeline[-1:] if timeline and (len(timeline) - 1) % step else [])


def print_table(r: dict) -> None:
    """Print bench.scale's report ``r`` (the JSON's dict) as a table: one row a phase or figure (name, value with its
    unit, details: img/s, s, ms/img, MiB)."""
    c, h = r["config"], r["headline"]
    mib = lambda b: f"{(b or 0) / 2**20:,.0f} MiB"  # noqa: E731
    print(f"\nbench.scale: {c['images']} images in {c['shards']} shards, {c['size']} px | {c['model']} "
          f"({c['weights']}) | {c['method']} | targets {c['targets']} | batch {c['batch_size']} | "
          f"{r['machine']['cpus']} CPUs, load {r['machine']['loadavg_before'][0]} -> "
          f"{r['machine']['loadavg_after'][0]}")
    rows = [("shard generation", f"{r['shards']['seconds']} s" + (" (cached)" if r["shards"]["cached"] else ""),
             f"{r['shards']['images_per_second']} img/s, {mib(r['shards']['bytes'])}")]
    for b in r["bare"]:
        rows.append((f"bare loop, {b['threads']} thread(s)", f"{b['seconds']} s",
                     f"{b['images_per_second']} img/s on {b['images']} (decode {b['decode_seconds']} s, "
                     f"compute {b['compute_seconds']} s), peak {mib(b['peak_rss_bytes'])}"))
    s = r["stages"]
    rows.append(("stages, 1 process, no Ray", f"{s['total_ms_per_image']} ms/img",
                 ", ".join(f"{k} {v}" for k, v in s["ms_per_image"].items())))
    p = r["pipeline"]
    rows += [
        ("pipeline (jobs.attribute)", f"{p['wall_seconds']} s",
         f"{h['pipeline_images_per_second']} img/s (job), steady {h['pipeline_steady_images_per_second']} img/s"),
        ("  ratio to bare (1 thread)", f"{h['ratio_to_bare']}", f"steady {h['steady_ratio_to_bare']}; "
                                                               f"to best bare {h['ratio_to_best_bare']}"),
        ("  CPU per image", f"{h['pipeline_cpu_ms_per_image']} ms",
         f"bare {h['bare_cpu_ms_per_image']} ms (ratio {h['cpu_ratio_bare_to_pipeline']}); other processes used "
         f"{100 * h['other_processes_cpu_share']:.0f} % of the machine meanwhile"),
        ("  CPU by process", f"{p['cpu']['job_cpu_seconds']} s",
         ", ".join(f"{k.replace('ray::', '')} {v['cpu_seconds']}" for k, v in list(p["cpu_by_process"].items())[:6])),
        ("  driver peak RSS", mib(h["driver_peak_rss_bytes"]),
         f"growth {p['driver_growth'].get('bytes_per_committed_shard', '?')} B/shard"),
        ("  Ray processes peak RSS", mib(h["ray_peak_rss_bytes"]),
         f"with the driver {mib(p['driver_and_ray_peak_rss_bytes'])} (without shared pages "
         f"{mib(p['driver_and_ray_peak_private_bytes'])}); {p['processes_seen']} processes started"),
        ("  object-store spilling", mib(h["spilled_bytes"]),
         f"spill dir peak {mib(p['spilling']['spill_dir_peak_bytes'])}, raylet {p['spilling']['raylet_spilled_mib']} "
         f"MiB / {p['spilling']['raylet_spilled_objects']} objects"),
        ("  files written", f"{h['files_written']}", f"{mib(h['bytes_written'])}; {h['attribution_files']} "
                                                     f"attribution files, {h['bytes_per_map']} B/map"),
        ("  manifest.json", f"{p['manifest'].get('manifest_bytes', 0):,} B",
         f"rewritten {p['manifest'].get('rewrites_per_run')}x, ~{p['manifest'].get('seconds_in_rewrites_est')} s"),
        ("  rows check", "ok" if h["pipeline_ok"] else "FAILED",
         f"{p['check']['rows']} rows, {p['check']['duplicates']} duplicates, {p['check']['missing']} missing"),
    ]
    e = r["evaluate"]
    rows += [("evaluate (ebpg,ibd)", f"{e['wall_seconds']} s",
              f"{h['evaluate_images_per_second']} img/s; driver {mib(e['driver_peak_rss_bytes'])}, Ray "
              f"{mib(e['ray_peak_rss_bytes'])}; {e['files']['files']} files; rows "
              f"{'ok' if h['evaluate_ok'] else 'FAILED'} ({e['check']['rows']})")]
    k, ck = r["resume"]["killed"], r["resume"]["check"]
    killed = k.get("killed") or {}
    rows += [
        ("killed run", f"{killed.get('at_seconds', '-')} s",
         f"SIGKILL at {killed.get('commits_at_kill_signal', '-')}/{c['shards']} commits "
         f"({h['killed_at_commits']} after); Ray processes alive at kill "
         f"{(killed.get('left_behind') or {}).get('ray_processes_alive_at_kill', '-')}, killed after grace "
         f"{(killed.get('left_behind') or {}).get('killed_after_grace', '-')}"),
        ("resume", f"{h['resume_seconds']} s", f"{h['resume_images']} images recomputed; first commit after "
                                                 f"{h['resume_first_commit_seconds']} s"),
        ("  rows check", "ok" if h["resume_ok"] else "FAILED",
         f"{ck['rows']} rows, {ck['duplicates']} duplicates, {ck['missing']} missing, {ck['stray_files']} stray files"),
    ]
    width = max(len(name) for name, _, _ in rows) + 2
    for name, value, detail in rows:
        print(f"{name:<{width}}{value:>16}  {detail}")

