import json

from absorber_memory.cli import main


def test_info_reports_home_and_device(capsys, absorber_home):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["data directory ($ABSORBER_HOME)"] == str(absorber_home)
    assert info["device (auto)"] in ("cpu", "cuda")


def test_demo_reports_library_errors_cleanly(capsys):
    assert main(["demo", "--max-steps", "0"]) == 2
    assert "`max_steps` must be >= 1" in capsys.readouterr().err
