"""The demo's data split and its closing quality table (the training stages themselves run in
`make demo`; tests/test_shipped_configs.py checks the jobs they load)."""

from __future__ import annotations

import numpy as np

from neuroray import demo
from neuroray.platform.box import Box
from neuroray.platform.volume import open_volume


def test_lm_stacks_lie_where_the_fine_tune_and_the_scores_look(tmp_path):
    run = demo.DemoRun(out=tmp_path)
    demo.stage_synthesise(run)
    demo.stage_ingest(run)
    labels = open_volume(run.urls["lm_stacks_labels"])
    image = open_volume(run.urls["lm_stacks_image"])
    assert labels.shape == image.shape == (demo.LM_TEST_ROI[3], *demo.DEMO_LM_SHAPE[1:])
    # every neuron is where its role's ROI says, and nothing lies between the stacks
    for i, name in enumerate(demo.LM_STACKS):
        box = Box.from_list(demo._lm_roi(i, i))
        assert labels.read(box).any(), name
        source = np.asarray(open_volume(run.urls[f"{name}_image_source"])[:])
        np.testing.assert_array_equal(image.read(box), source)
    depth = demo.DEMO_LM_SHAPE[0]
    gap = [depth, 0, 0, depth + demo.LM_GAP_Z, *demo.DEMO_LM_SHAPE[1:]]  # after the first stack
    assert not labels.read(Box.from_list(gap)).any() and not image.read(Box.from_list(gap)).any()
    train, valid, test = (
        Box.from_list(r) for r in (demo.LM_TRAIN_ROI, demo.LM_VALID_ROI, demo.LM_TEST_ROI)
    )
    assert train.intersect(valid).empty and valid.intersect(test).empty

    # a rerun keeps the sources (and so resumes the layers made from them)
    links = {p: p.resolve().stat().st_mtime_ns for p in (tmp_path / "sources" / "lm").glob("*.*")}
    demo.stage_synthesise(run)
    demo.stage_ingest(run)
    assert {p: p.resolve().stat().st_mtime_ns for p in links} == links


def test_the_quality_table_puts_each_learned_result_beside_the_baseline(tmp_path, capsys):
    run = demo.DemoRun(out=tmp_path)
    demo.add_quality(run, "EM neurons, z 48-64", "VOI", "min", "UNETR", 0.8, 1.5)
    demo.add_quality(run, "LM neurons, test neuron", "Dice", "max", "UNETR", 0.8, 0.9)
    rows = run.results["quality"]
    assert [r["beats_baseline"] for r in rows] == [True, False]
    demo.print_quality(rows)
    lines = capsys.readouterr().out.strip().splitlines()
    assert "no learning" in lines[0]
    assert "1.500" in lines[1] and "0.800" in lines[1] and "beats no learning" in lines[1]
    assert "does NOT beat no learning" in lines[2]
