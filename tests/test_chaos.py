"""Chaos: faults on every path and the importer killed twice; nothing lost, nothing doubled."""

from __future__ import annotations

import json
import random
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import yaml

from importer.manifest import load_manifest
from importer.plan import make_plan
from tests.examples import example_manifest
from tests.processes import ENV, importer_command, simulator_process, simulator_state

ENTRIES = 200


def chaos_manifest(path: Path, base_url: str) -> Path:
    """200 generated entries, every 20th of which fails to import (a corrupt archive).

    The files are on the simulator's file host, so that probing them (size and
    version) stays on loopback.
    """
    document = yaml.safe_load(example_manifest(ENTRIES, seed=5))
    for number, image in enumerate(document["images"]):
        if number % 20 == 7:
            image["url"] = image["url"].replace(image["name"], image["name"] + "-fail-decompress")
        image["url"] = f"{base_url}/_files/{image['url'].rsplit('/', 1)[-1]}"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.slow
def test_killed_twice_under_faults_ends_with_exactly_one_image_per_entry(tmp_path: Path) -> None:
    """SIGKILL twice mid-run, 10% 5xx, 5% lost creates, resets, slow answers: truth == report."""
    rng = random.Random(2026)
    faults = (
        "--seed", "11", "--error-rate", "0.10", "--lost-create-rate", "0.05",
        "--reset-rate", "0.03", "--slow-rate", "0.05", "--slow-seconds", "1",
        "--per-minute", "100000", "--per-hour", "1000000",
        # Imports of about a second: the test is about faults and kills, not waiting.
        "--new-seconds", "0.3", "--pending-seconds", "0.5", "--seconds-per-gib", "0.05",
    )  # fmt: skip
    with simulator_process(*faults) as base_url:
        manifest_path = chaos_manifest(tmp_path / "chaos.yaml", base_url)
        plan = make_plan(load_manifest(manifest_path))
        command = importer_command(
            manifest_path, base_url, tmp_path,
            "--per-minute", "100000", "--per-hour", "1000000", "--concurrency", "16",
            "--first-poll", "1s", "--poll-interval", "1s", "--timeout", "6s",
        )  # fmt: skip
        kills = 0
        exit_codes = []
        for _ in range(8):
            with subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV
            ) as process:
                assert process.stderr is not None
                if kills < 2:
                    # A random moment, measured in the importer's own progress: after some
                    # number of log lines (submissions, statuses, retries) rather than seconds.
                    target = rng.randint(50, 400)
                    for seen, _line in enumerate(process.stderr, start=1):
                        if seen >= target:
                            break
                    process.kill()
                    process.wait()
                    kills += 1
                    continue
                process.stderr.read()
                exit_codes.append(process.wait(timeout=180))
                break
        truth = simulator_state(base_url)

    assert kills == 2
    assert exit_codes == [1]  # some entries fail on purpose; nothing else may
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["stopped"] is None
    assert report["summary"]["total"] == ENTRIES

    live: Counter[str] = Counter()
    images_by_id = {image["id"]: image for image in truth["images"]}
    for image in truth["images"]:
        if image["status"] != "deleted" and not image["deleted_by_user"]:
            live.update(tag for tag in image["tags"] if tag.startswith("importer:"))
    expected_live = {item.tag for item in plan if "fail-decompress" not in item.entry.url}
    assert set(live) == expected_live
    assert set(live.values()) == {1}, "a duplicate image was left behind"

    for item, result in zip(plan, report["images"], strict=True):
        assert result["tag"] == item.tag
        assert result["image_id"] in images_by_id, json.dumps(result)
        image = images_by_id[result["image_id"]]
        assert item.tag in image["tags"]
        if "fail-decompress" in item.entry.url:
            assert result["outcome"] == "failed"
            assert image["status"] == "deleted"
            assert result["error"] == image["error_message"]
        else:
            assert result["outcome"] == "available"
            assert image["status"] == "available"
