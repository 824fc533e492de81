"""``diskhooks-sidecar`` as a user runs it: ``python -m hooksidecar.cli dry-run|serve|prepare``.

``dry-run`` runs on KubeVirt's sample 01 with a diskhooks plan and real qcow2 images made by
``qemu-img`` (see ``tests/test_sidecar_server.py`` for the sample); exit codes and messages are
what a user sees. The memory discipline of ``serve`` (no YAML, no protobuf runtime) is checked in a
fresh interpreter. Only ``test_prepare_is_handed_its_arguments`` replaces a module: a recording
``hooksidecar.prepare`` stands in to show what the CLI hands over (the real prepare step is tested
in its own module).
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from hooksidecar import cli
from tests.conftest import ROOT, SAMPLES
from tests.test_sidecar_server import SAMPLE01, PlannedSample, build_sample, disk_by_alias, subprocess_env


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hooksidecar.cli", *args], check=False, cwd=ROOT,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> PlannedSample:
    return build_sample(tmp_path_factory.mktemp("prefix"))


@pytest.fixture
def files(tmp_path: Path, sample: PlannedSample) -> dict[str, Path]:
    out = {"vmi": tmp_path / "vmi.json", "bare": tmp_path / "bare.json", "domain": tmp_path / "domain.xml"}
    out["vmi"].write_bytes(sample.vmi)
    out["bare"].write_bytes(sample.vmi_without_plan)
    out["domain"].write_bytes(sample.first_call)
    return out


# ------------------------------------------------------------------------------------------------
# dry-run
# ------------------------------------------------------------------------------------------------
def test_dry_run_prints_the_rewritten_domain(files: dict[str, Path], sample: PlannedSample) -> None:
    res = run_cli("dry-run", "--vmi", str(files["vmi"]), "--domain", str(files["domain"]),
                  "--path-prefix", str(sample.prefix))
    assert res.returncode == 0, res.stderr
    out = res.stdout.encode()
    assert b'type="qcow2"' in disk_by_alias(out, "ua-datadisk")
    assert b"backingStore" in disk_by_alias(out, "ua-scratch")
    # a second dry run on the first one's output changes nothing
    files["domain"].write_bytes(out)
    again = run_cli("dry-run", "--vmi", str(files["vmi"]), "--domain", str(files["domain"]),
                    "--path-prefix", str(sample.prefix))
    assert again.returncode == 0 and again.stdout == res.stdout


def test_dry_run_warns_about_an_image_larger_than_planned(files: dict[str, Path], tmp_path: Path) -> None:
    """What the served sidecar puts on its log line (and prepare on its own), the dry run says on
    stderr; the output is the same as for the planned size."""
    from tests.test_sidecar_server import qemu_img

    larger = build_sample(tmp_path / "larger")
    datadisk = larger.prefix / "var/run/kubevirt-private/vmi-disks/datadisk/datadisk.qcow2"
    datadisk.unlink()
    qemu_img("create", "-q", "-f", "qcow2", str(datadisk), "12G")  # planned 10 GiB
    res = run_cli("dry-run", "--vmi", str(files["vmi"]), "--domain", str(files["domain"]),
                  "--path-prefix", str(larger.prefix))
    assert res.returncode == 0, res.stderr
    assert "warning: volume datadisk: /var/run/kubevirt-private/vmi-disks/datadisk/datadisk.qcow2 is " \
        "larger than planned (12884901888 bytes, planned 10737418240)" in res.stderr
    unchecked = run_cli("dry-run", "--vmi", str(files["vmi"]), "--domain", str(files["domain"]),
                        "--no-image-check")
    assert res.stdout == unchecked.stdout


def test_dry_run_diff_shows_only_the_planned_disks(files: dict[str, Path]) -> None:
    res = run_cli("dry-run", "--vmi", str(files["vmi"]), "--domain", str(files["domain"]), "--diff",
                  "--no-image-check")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("--- a/domain.xml\n+++ b/domain.xml\n")
    added = [line for line in res.stdout.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert any('type="qcow2"' in line for line in added)
    assert not any("cloud-init" in line or "interface" in line for line in added)


def test_dry_run_without_a_plan_changes_nothing(files: dict[str, Path], sample: PlannedSample) -> None:
    res = run_cli("dry-run", "--vmi", str(files["bare"]), "--domain", str(files["domain"]))
    assert res.returncode == 0 and res.stdout.encode() == sample.first_call
    diff = run_cli("dry-run", "--vmi", str(files["bare"]), "--domain", str(files["domain"]), "--diff")
    assert diff.returncode == 0 and diff.stdout == "" and "no change" in diff.stderr


def test_dry_run_without_a_path_prefix_checks_no_images(files: dict[str, Path]) -> None:
    """On a laptop there are no pod mounts: without --path-prefix the plan is applied from the VMI
    alone, and stderr says the images were not checked."""
    res = run_cli("dry-run", "--vmi", str(files["vmi"]), "--domain", str(files["domain"]), "--diff")
    assert res.returncode == 0, res.stderr
    assert any('type="qcow2"' in line for line in res.stdout.splitlines() if line.startswith("+"))
    assert "images not checked (no --path-prefix given)" in res.stderr
    help_text = run_cli("dry-run", "--help").stdout
    assert "only when --path-prefix is given" in " ".join(help_text.split())


def test_dry_run_with_a_path_prefix_says_it_checks_the_images(files: dict[str, Path],
                                                              sample: PlannedSample) -> None:
    res = run_cli("dry-run", "--vmi", str(files["vmi"]), "--domain", str(files["domain"]),
                  "--path-prefix", str(sample.prefix))
    assert res.returncode == 0, res.stderr
    assert f"checking the images under {sample.prefix}" in res.stderr
    skipped = run_cli("dry-run", "--vmi", str(files["vmi"]), "--domain", str(files["domain"]),
                      "--path-prefix", "/nonexistent-prefix-is-refused")
    assert skipped.returncode == 2 and "not a directory" in skipped.stderr


def test_serve_always_checks_the_images(sock_dir: Path, sample: PlannedSample) -> None:
    """``serve`` has no way to skip the checks: without a prefix it looks at the real launcher
    paths, which do not exist here, and refuses naming the volume."""
    import grpc

    from tests.test_sidecar_server import call_on_define, rpc_error, start_sidecar

    assert "--no-image-check" not in run_cli("serve", "--help").stdout
    sidecar = start_sidecar(sock_dir)
    try:
        err = rpc_error(call_on_define, sidecar.target, "v1alpha3", sample.first_call, sample.vmi)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.details().startswith("volume datadisk: ") and "not mounted" in err.details()
    finally:
        sidecar.stop()


def test_dry_run_refused_exits_1_naming_the_volume(files: dict[str, Path], tmp_path: Path) -> None:
    """Images checked under an empty prefix: nothing is mounted, the plan cannot be applied."""
    empty = tmp_path / "empty"
    empty.mkdir()
    res = run_cli("dry-run", "--vmi", str(files["vmi"]), "--domain", str(files["domain"]),
                  "--path-prefix", str(empty))
    assert res.returncode == 1 and res.stdout == ""
    assert "refused" in res.stderr and "datadisk" in res.stderr


def test_dry_run_raw_image_exits_1(files: dict[str, Path], tmp_path: Path) -> None:
    raw = build_sample(tmp_path / "raw", raw_datadisk=True)
    res = run_cli("dry-run", "--vmi", str(files["vmi"]), "--domain", str(files["domain"]),
                  "--path-prefix", str(raw.prefix))
    assert res.returncode == 1 and "datadisk" in res.stderr and "raw" in res.stderr


@pytest.mark.parametrize("what, content, reason", [
    ("vmi", b'{"metadata": ', "not valid JSON"),
    ("vmi", b"[1, 2]", "JSON object"),
    ("domain", b"<domain><devices>", "not well-formed"),
    ("domain", b'<!DOCTYPE d [<!ENTITY e SYSTEM "file:///etc/passwd">]><domain>&e;</domain>', "DOCTYPE"),
    ("vmi", b'{"a":' * 100000, "vmi: the VMI JSON is nested too deeply"),
])
def test_dry_run_unusable_input_exits_2(files: dict[str, Path], what: str, content: bytes, reason: str) -> None:
    files[what].write_bytes(content)
    res = run_cli("dry-run", "--vmi", str(files["vmi"]), "--domain", str(files["domain"]), "--no-image-check")
    assert res.returncode == 2 and res.stdout == ""
    assert reason in res.stderr and "Traceback" not in res.stderr


def test_dry_run_deeply_nested_yaml_exits_2(files: dict[str, Path], tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 100000)
    res = run_cli("dry-run", "--vmi", str(deep), "--domain", str(files["domain"]), "--no-image-check")
    assert res.returncode == 2 and "nested too deeply" in res.stderr and "Traceback" not in res.stderr


def test_dry_run_missing_file_exits_2(files: dict[str, Path], tmp_path: Path) -> None:
    res = run_cli("dry-run", "--vmi", str(tmp_path / "nope.json"), "--domain", str(files["domain"]))
    assert res.returncode == 2 and "cannot read" in res.stderr and "nope.json" in res.stderr


def test_dry_run_reads_yaml_and_virtual_machines(tmp_path: Path, sample: PlannedSample,
                                                 files: dict[str, Path]) -> None:
    """A VMI in YAML, and a VirtualMachine whose template carries the plan (what
    ``diskhooks-webhook dry-run`` prints), give the same answer as the VMI JSON."""
    vmi = json.loads(sample.vmi)
    as_yaml = tmp_path / "vmi.yaml"
    as_yaml.write_text(yaml.safe_dump(vmi))
    vm = {"apiVersion": "kubevirt.io/v1", "kind": "VirtualMachine",
          "metadata": {"name": vmi["metadata"]["name"], "namespace": vmi["metadata"]["namespace"]},
          "spec": {"runStrategy": "Always", "template": {
              "metadata": {"annotations": vmi["metadata"]["annotations"]}, "spec": vmi["spec"]}}}
    as_vm = tmp_path / "vm.yaml"
    as_vm.write_text(yaml.safe_dump(vm))
    expected = run_cli("dry-run", "--vmi", str(files["vmi"]), "--domain", str(files["domain"]),
                       "--no-image-check").stdout
    assert 'type="qcow2"' in expected
    for path in (as_yaml, as_vm):
        res = run_cli("dry-run", "--vmi", str(path), "--domain", str(files["domain"]), "--no-image-check")
        assert res.returncode == 0, res.stderr
        assert res.stdout == expected


def test_dry_run_on_the_unplanned_sample_yaml(sample: PlannedSample) -> None:
    res = run_cli("dry-run", "--vmi", str(SAMPLE01.parent / (SAMPLE01.name + ".yaml")),
                  "--domain", str(SAMPLES / (SAMPLE01.name + ".domain.xml")))
    assert res.returncode == 0, res.stderr
    assert res.stdout.encode() == (SAMPLES / (SAMPLE01.name + ".domain.xml")).read_bytes()


def test_dry_run_bad_yaml_exits_2(tmp_path: Path, files: dict[str, Path]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("metadata: [unclosed\n")
    res = run_cli("dry-run", "--vmi", str(bad), "--domain", str(files["domain"]))
    assert res.returncode == 2 and "not valid YAML" in res.stderr


# ------------------------------------------------------------------------------------------------
# serve arguments (the running server is tested in test_sidecar_server.py)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, reason", [
    (["--name", "../etc/x"], "not a DNS label"),
    (["--name", "Hooks"], "not a DNS label"),
    (["--version", "v2"], "invalid choice"),
    (["--grace", "-1"], "between 0 and 300"),
    (["--path-prefix", "relative/dir"], "not an absolute path"),
])
def test_serve_refuses_bad_arguments(tmp_path: Path, args: list[str], reason: str) -> None:
    res = run_cli("serve", "--socket-dir", str(tmp_path), *args)
    assert res.returncode == 2 and reason in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_the_webhooks_sidecar_args_offer_every_hook_version(tmp_path: Path) -> None:
    """The webhook gives the sidecar ``serve --version v1alpha3``; that must offer v1alpha3, v1alpha2
    and v1alpha1 (a KubeVirt 1.0 virt-launcher knows no v1alpha3)."""
    from hooksidecar import cli
    from webhook.vm.sidecars import SIDECAR_ARGS

    args = cli.build_parser().parse_args([*SIDECAR_ARGS, "--socket-dir", str(tmp_path)])
    assert cli.versions_up_to(args.version) == ("v1alpha3", "v1alpha2", "v1alpha1")
    assert cli.versions_up_to("v1alpha2") == ("v1alpha2", "v1alpha1")
    assert "newest hook API version to offer" in run_cli("serve", "--help").stdout


def test_serve_needs_an_existing_socket_dir(tmp_path: Path) -> None:
    res = run_cli("serve", "--socket-dir", str(tmp_path / "missing"))
    assert res.returncode == 2 and "is not a directory" in res.stderr
    assert not (tmp_path / "missing").exists()


def test_serve_imports_only_what_it_needs() -> None:
    """The sidecar runs under a 64M limit: the CLI itself is light, and serve loads neither YAML,
    jsonschema nor the protobuf runtime (it speaks the wire format with its own codec)."""
    code = ("import sys; import hooksidecar.cli; light = sorted(m for m in ('grpc', 'lxml', 'yaml') "
            "if m in sys.modules); import hooksidecar.server; "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('yaml', 'jsonschema', 'google') "
            "or m.startswith('hooksidecar._pb') or m == 'hooksidecar.prepare'); print(light, heavy)")
    res = subprocess.run([sys.executable, "-c", code], check=False, cwd=ROOT, env=subprocess_env(),
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[] []"


# ------------------------------------------------------------------------------------------------
# prepare
# ------------------------------------------------------------------------------------------------
def test_prepare_is_handed_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(list(argv))
        return 3

    fake = types.ModuleType("hooksidecar.prepare")
    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "hooksidecar.prepare", fake)
    # once the real module was imported (by another test), `from hooksidecar import prepare` reads
    # the package attribute, so replace that too
    import hooksidecar

    monkeypatch.setattr(hooksidecar, "prepare", fake, raising=False)
    assert cli.main(["prepare", "--plan", "/x/plan.json", "--help"]) == 3
    assert seen == [["--plan", "/x/plan.json", "--help"]]


def test_prepare_reaches_the_real_prepare_step() -> None:
    try:
        import hooksidecar.prepare  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "hooksidecar.prepare":
            raise
        pytest.skip("hooksidecar/prepare.py does not exist yet")
    res = run_cli("prepare", "--help")
    assert res.returncode == 0, res.stderr
    assert "prepare" in res.stdout
