"""The experiment driver: rows, scoring on one class list, the results table, `tttkd adapt`."""

def test_cli_adapt_writes_the_results_table(joint_checkpoint, synth_cache, tmp_path):
    from typer.testing import CliRunner

    from tttkd.cli.main import app

    out = tmp_path / "res"
    result = CliRunner().invoke(app, ["adapt", "--source", "synth_a", "--target", "synth_a", "--checkpoint",
                                      str(joint_checkpoint), "--cache", str(synth_cache), "--steps", "2",
                                      "--rotations", "1", "--kd-points", "512", "--lr", "0.1", "--out", str(out),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    table = (out / "results.md").read_text()
    for row in ("Joint-Train", "TENT", "DUA", "AdaContrast", "TTT-KD-O", "TTT-KD"):
        assert f"| {row} |" in table
    record = __import__("json").loads((out / "results.json").read_text())
    ttt = next(r for r in record["results"] if r["method"] == "ttt-kd")
    assert set(ttt["miou_by_step"]) == {"0", "1", "2"} and (out / "miou_vs_steps.png").exists()
    result = CliRunner().invoke(app, ["adapt", "--source", "nowhere", "--target", "synth_a", "--cache",
                                      str(synth_cache), "--device", "cpu"])
    assert result.exit_code == 1 and "runs/nowhere/last.pt: no checkpoint here" in result.output

