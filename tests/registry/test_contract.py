"""One contract every registry backend combination must honour (see conftest.BACKENDS)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from farm.registry import NotFound, PublishError, open_registry
from farm.registry.catalog import Principal
from farm.registry.names import NameError_
from farm.registry.store import IntegrityError

from .conftest import make_lora_adapter


def _publish(registry, base_model_dir, adapter_dir, tenant="acme", adapter="support", **kw):
    return registry.publish(tenant, adapter, adapter_dir, base_model=str(base_model_dir), **kw)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TestRegistryContract:
    def test_publish_resolve_download_and_immutable_serve_names(self, registry, base_model_dir,
                                                                 adapter_dir, tmp_path):
        v1 = _publish(registry, base_model_dir, adapter_dir, metrics={"eval_loss": 2.5},
                      lineage={"sweep_id": "sweep-a", "dataset_fingerprint": "f" * 64})
        assert v1.serve_name == "acme.support.v1" and v1.servable_by_vllm and v1.rank == 8
        assert v1.method == "lora" and v1.aliases == ["latest"]
        assert v1.files["adapter_model.safetensors"]["sha256"] == _sha(adapter_dir / "adapter_model.safetensors")
        assert v1.lineage["code_version"] and v1.lineage["sweep_id"] == "sweep-a"
        v2 = _publish(registry, base_model_dir, adapter_dir, metrics={"eval_loss": 1.5})
        assert v2.serve_name == "acme.support.v2"
        assert registry.resolve("acme.support@latest").version == 2
        assert registry.resolve("acme.support.v1").metrics == {"eval_loss": 2.5}  # v1 unchanged
        got = registry.download("acme.support.v1", tmp_path / "dl")
        assert got.version == 1
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            assert _sha(tmp_path / "dl" / name) == _sha(adapter_dir / name)
        with pytest.raises(NotFound):
            registry.resolve("acme.support.v9")
        with pytest.raises(NotFound):
            registry.resolve("acme.other@latest")

    def test_search_filters_sort_and_pagination(self, registry, base_model_dir, adapter_dir, tmp_path):
        odd_rank = make_lora_adapter(base_model_dir, tmp_path / "r4", rank=4)
        for index, tenant in enumerate(["acme", "acme", "globex", "hooli"]):
            _publish(registry, base_model_dir, adapter_dir, tenant=tenant,
                     metrics={"eval_loss": 3.0 - index * 0.5},
                     lineage={"sweep_id": "s-even" if index % 2 == 0 else "s-odd"})
        bad = _publish(registry, base_model_dir, odd_rank, tenant="globex", adapter="tiny")
        assert not bad.servable_by_vllm and "rank 4" in bad.not_servable_reason
        items, total = registry.search()
        assert total == 5 and len(items) == 5
        assert {v.serve_name for v in registry.search(tenant="acme")[0]} == {"acme.support.v1", "acme.support.v2"}
        assert [v.serve_name for v in registry.search(servable=False)[0]] == ["globex.tiny.v1"]
        assert registry.search(sweep_id="s-odd")[1] == 2
        assert registry.search(base_model=str(base_model_dir))[1] == 5
        assert registry.search(method="dora")[1] == 0
        best = registry.search(metric_filters=[("eval_loss", "<=", 2.0)], sort="metric:eval_loss")[0]
        assert [v.metrics["eval_loss"] for v in best] == [1.5, 2.0]
        page1, total = registry.search(sort="version", limit=2, offset=0, tenant="acme")
        page2, _ = registry.search(sort="version", limit=2, offset=2, tenant="acme")
        assert [v.version for v in page1] == [1, 2] and page2 == [] and total == 2
        assert registry.search(alias="latest")[1] == 4  # one latest per adapter
        newest = registry.search(sort="-created_at", limit=1)[0][0]
        assert newest.serve_name == "globex.tiny.v1"
        with pytest.raises(ValueError):
            registry.search(sort="colour")

    def test_aliases_archive_delete_and_numbers_never_reused(self, registry, base_model_dir, adapter_dir):
        for _ in range(3):
            _publish(registry, base_model_dir, adapter_dir)
        assert registry.set_alias("acme", "support", "production", 1) == (None, 1)
        assert registry.resolve("acme.support@production").version == 1
        assert registry.set_alias("acme", "support", "production", 2) == (1, 2)  # moved
        assert registry.resolve("acme.support@production").version == 2
        assert registry.delete_alias("acme", "support", "production") == 2
        with pytest.raises(NotFound):
            registry.resolve("acme.support@production")
        registry.archive("acme", "support", 3)  # holds `latest`: archiving drops the alias
        assert registry.search(tenant="acme")[1] == 2
        assert registry.search(tenant="acme", status="archived")[1] == 1
        with pytest.raises(NotFound):
            registry.resolve("acme.support@latest")
        registry.delete("acme", "support", 2)
        with pytest.raises(NotFound):
            registry.resolve("acme.support.v2")
        assert registry.store.read_manifest("acme", "support", 2) is None
        assert _publish(registry, base_model_dir, adapter_dir).version == 4  # 2 is not reused
        with pytest.raises(NotFound):
            registry.set_alias("acme", "support", "production", 2)

    def test_alias_history_keeps_every_move_with_its_note(self, registry, base_model_dir, adapter_dir):
        for _ in range(2):
            _publish(registry, base_model_dir, adapter_dir)
        decision = {"decision": "promoted", "reason": "every check passed", "candidate": {"eval_loss": 0.05}}
        registry.set_alias("acme", "support", "production", 1)
        registry.set_alias("acme", "support", "production", 2, note=decision)
        registry.delete_alias("acme", "support", "production")
        events = registry.alias_history("acme", "support", "production")
        assert [(e["version"], e["previous"]) for e in events] == [(1, None), (2, 1), (None, 2)]
        assert events[0]["note"] is None and events[1]["note"] == decision and events[2]["at"]
        assert [e["version"] for e in registry.alias_history("acme", "support", "latest")] == [1, 2]
        assert len(registry.alias_history("acme", "support")) == 5
        with pytest.raises(NotFound):  # another tenant's history, as a missing adapter's
            registry.alias_history("acme", "support", principal=Principal("globex"))
        with pytest.raises(NotFound):
            registry.alias_history("acme", "nothing")
        for bad in ({"x": "y" * 20000}, {"nan": float("nan")}, ["not", "an", "object"]):
            with pytest.raises(ValueError, match="note"):
                registry.set_alias("acme", "support", "production", 1, note=bad)
        assert len(registry.alias_history("acme", "support", "production")) == 3  # refused notes moved nothing

    def test_tenant_principal_sees_only_its_own_tenant(self, registry, base_model_dir, adapter_dir, tmp_path):
        _publish(registry, base_model_dir, adapter_dir, tenant="acme")
        _publish(registry, base_model_dir, adapter_dir, tenant="globex")
        acme = Principal("acme")
        assert [v.tenant for v in registry.search(acme)[0]] == ["acme"]
        assert registry.search(acme, tenant="globex") == ([], 0)
        for call in (lambda: registry.resolve("globex.support.v1", acme),
                     lambda: registry.resolve("globex.support@latest", acme),
                     lambda: registry.download("globex.support.v1", tmp_path / "x", acme),
                     lambda: registry.set_alias("globex", "support", "production", 1, acme),
                     lambda: registry.delete_alias("globex", "support", "latest", acme),
                     lambda: registry.archive("globex", "support", 1, acme),
                     lambda: registry.delete("globex", "support", 1, acme)):
            with pytest.raises(NotFound):
                call()
        assert registry.resolve("globex.support@latest").version == 1  # untouched

    def test_traversal_names_and_pickles_are_refused(self, registry, base_model_dir, adapter_dir, tmp_path):
        for tenant, adapter in (("../evil", "a"), ("acme", "a/b"), ("acme", ".."), ("ACME", "a"),
                                ("acme", "a\x00b"), ("/abs", "a")):
            with pytest.raises(NameError_):
                _publish(registry, base_model_dir, adapter_dir, tenant=tenant, adapter=adapter)
        with pytest.raises(NameError_):
            _publish(registry, base_model_dir, adapter_dir, aliases=("../prod",))
        pickled = tmp_path / "pickled"
        shutil.copytree(adapter_dir, pickled)
        (pickled / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")
        with pytest.raises(PublishError, match="pickle"):
            _publish(registry, base_model_dir, pickled)
        fake = tmp_path / "fake"
        shutil.copytree(adapter_dir, fake)
        (fake / "adapter_model.safetensors").write_bytes(b"\x80\x04 definitely not safetensors")
        with pytest.raises(PublishError, match="not a valid safetensors"):
            _publish(registry, base_model_dir, fake)
        assert registry.search()[1] == 0 and registry.store.scan().versions == []

    def test_concurrent_publishes_get_distinct_versions(self, registry, base_model_dir, adapter_dir):
        with ThreadPoolExecutor(max_workers=8) as pool:
            infos = list(pool.map(lambda _: _publish(registry, base_model_dir, adapter_dir), range(20)))
        assert sorted(i.version for i in infos) == list(range(1, 21))
        assert registry.search(limit=100)[1] == 20
        assert registry.resolve("acme.support@latest").version == 20  # latest only moves forward

    def test_a_publish_killed_between_writes_leaves_no_visible_version(self, registry_env, registry,
                                                                       base_model_dir, adapter_dir):
        store, catalog = registry_env
        # A real process, SIGKILLed right before its manifest (the last write) lands.
        script = textwrap.dedent(f"""
            import os, signal
            from pathlib import Path
            from farm.registry import open_registry
            from farm.registry.store import Store
            real_put = Store._put
            def dying_put(self, destination, data):
                if destination.endswith("manifest.json"):
                    os.kill(os.getpid(), signal.SIGKILL)
                real_put(self, destination, data)
            Store._put = dying_put
            registry = open_registry({store!r}, {catalog!r})
            registry.publish("acme", "support", Path({str(adapter_dir)!r}), base_model={str(base_model_dir)!r})
        """)
        proc = subprocess.run([sys.executable, "-c", script], env=os.environ.copy(), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == -9, proc.stderr[-2000:]
        assert registry.search()[1] == 0
        with pytest.raises(NotFound):
            registry.resolve("acme.support@latest")
        assert registry.store.scan().versions == []
        leftovers = registry.gc(older_than_s=0)
        assert len(leftovers) == 1  # the weights written before the kill
        assert registry.gc(older_than_s=0) == []
        after = _publish(registry, base_model_dir, adapter_dir)
        assert after.version == 2  # number 1 was allocated to the dead publish; never reused

    def test_reindex_rebuilds_the_catalog_from_manifests(self, registry_env, registry, base_model_dir,
                                                         adapter_dir, tmp_path):
        _publish(registry, base_model_dir, adapter_dir, metrics={"eval_loss": 1.0})
        _publish(registry, base_model_dir, adapter_dir, tenant="globex")
        _publish(registry, base_model_dir, adapter_dir, tenant="globex")
        store, _ = registry_env
        fresh = open_registry(store, f"sqlite:///{tmp_path / 'rebuilt.sqlite'}")
        assert fresh.search()[1] == 0
        assert fresh.reindex().versions == 3
        assert fresh.resolve("globex.support@latest").version == 2
        assert fresh.resolve("acme.support.v1").metrics == {"eval_loss": 1.0}
        assert _publish(fresh, base_model_dir, adapter_dir, tenant="globex").version == 3

    def test_reindex_restores_every_row_alias_and_status_and_skips_what_it_cannot_parse(
            self, registry_env, registry, base_model_dir, adapter_dir, tmp_path):
        """Found by trying it: one bad folder made reindex wipe the catalog (18 versions became 4)."""
        import json as json_

        from farm.registry.store import MANIFEST

        for tenant in ("acme", "acme", "acme", "globex", "globex"):
            _publish(registry, base_model_dir, adapter_dir, tenant=tenant, metrics={"eval_loss": 1.5})
        registry.set_alias("acme", "support", "production", 2)
        registry.set_alias("acme", "support", "canary", 3)
        registry.set_alias("acme", "support", "latest", 1)  # moved back by hand
        registry.archive("acme", "support", 3)  # loses canary
        registry.set_alias("globex", "support", "production", 1)
        registry.delete_alias("globex", "support", "production")
        registry.set_alias("globex", "support", "staging", 2)
        registry.delete("globex", "support", 2)  # takes staging and latest with it
        before = sorted((v.to_dict() for v in registry.search(status=None, limit=500)[0]),
                        key=lambda v: v["serve_name"])
        # poison: a manifest that is not JSON, one whose rank is a list, a folder with a bad name
        store = registry.store
        poisoned = {f"{store.version_dir('acme', 'support', 7)}/{MANIFEST}": b"{not json",
                    f"{store.root}/adapters/acme/Bad Name/v1/{MANIFEST}": b"{}"}
        good = json_.loads(store.fs.open_input_stream(
            f"{store.version_dir('acme', 'support', 1)}/{MANIFEST}").read())
        good.update(version=8, serve_name="acme.support.v8")
        good["method_settings"]["r"] = [1, 2]
        poisoned[f"{store.version_dir('acme', 'support', 8)}/{MANIFEST}"] = json_.dumps(good).encode()
        for path, body in poisoned.items():
            if not store.object_store:
                store.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            with store.fs.open_output_stream(path) as out:
                out.write(body)
        report = registry.reindex()
        assert report.versions == 4
        assert sorted(item["path"] for item in report.skipped) == sorted(
            [f"{store.root}/adapters/acme/Bad Name", store.version_dir("acme", "support", 8),
             f"{store.version_dir('acme', 'support', 7)}/{MANIFEST}"])
        after = sorted((v.to_dict() for v in registry.search(status=None, limit=500)[0]),
                       key=lambda v: v["serve_name"])
        assert after == before
        assert registry.resolve("acme.support@latest").version == 1
        assert registry.resolve("acme.support@production").version == 2
        assert registry.get("acme", "support", 3).status == "archived"
        assert registry.get("globex", "support", 1).aliases == []  # its latest went with v2
        for path in poisoned:  # nothing it could not parse was touched
            assert store.fs.get_file_info(path).type.name == "File"
        # the catalog lost altogether: a fresh one gets the same rows back
        _, catalog_url = registry_env
        fresh = open_registry(store.uri, f"sqlite:///{tmp_path / 'lost.sqlite'}")
        assert fresh.reindex().versions == 4
        again = sorted((v.to_dict() for v in fresh.search(status=None, limit=500)[0]),
                       key=lambda v: v["serve_name"])
        assert again == before
        assert _publish(fresh, base_model_dir, adapter_dir).version == 9  # 7 and 8 have folders: taken

    def test_a_version_is_invisible_until_complete(self, registry, base_model_dir, adapter_dir, monkeypatch):
        """While its files are written, nothing shows the version: not the catalog, not a store scan,
        and on a file system not even its final folder (written under a temporary name, then renamed)."""
        store, seen = registry.store, []
        upload = store._upload

        def watched(source, destination):
            final = store.version_dir("acme", "support", 1)
            seen.append((registry.search(status=None)[1], len(store.scan().versions),
                         store.object_store or store.fs.get_file_info(final).type.name == "NotFound",
                         destination.startswith(final + "/") and not store.object_store))
            return upload(source, destination)

        monkeypatch.setattr(store, "_upload", watched)
        _publish(registry, base_model_dir, adapter_dir)
        from farm.registry.validate import folder_files

        assert len(seen) == len(folder_files(adapter_dir))  # each file of the adapter
        assert all(entry == (0, 0, True, False) for entry in seen), seen
        assert registry.resolve("acme.support.v1").version == 1

    def test_two_writers_racing_for_one_number_never_share_a_folder(self, registry, base_model_dir, adapter_dir):
        from farm.registry.validate import folder_files

        manifest = {"tenant": "acme", "adapter": "support", "version": 5}
        registry.store.write_version("acme", "support", 5, folder_files(adapter_dir), manifest)
        with pytest.raises(FileExistsError):
            registry.store.write_version("acme", "support", 5, folder_files(adapter_dir), manifest)

    def test_a_safetensors_file_without_tensors_is_refused(self, registry, base_model_dir, adapter_dir, tmp_path):
        import shutil

        from safetensors.torch import save_file

        from farm.registry.validate import PublishError

        folder = tmp_path / "empty"
        shutil.copytree(adapter_dir, folder)
        save_file({}, str(folder / "adapter_model.safetensors"))
        with pytest.raises(PublishError, match="holds no tensors"):
            _publish(registry, base_model_dir, folder)
        assert registry.search(status=None)[1] == 0

    def test_a_damaged_stored_file_is_detected_on_download(self, registry, base_model_dir, adapter_dir, tmp_path):
        info = _publish(registry, base_model_dir, adapter_dir)
        path = f"{registry.store.version_dir('acme', 'support', info.version)}/adapter_model.safetensors"
        with registry.store.fs.open_output_stream(path) as out:
            out.write(b"tampered")
        with pytest.raises(IntegrityError):
            registry.download("acme.support.v1", tmp_path / "dl")

    def test_serving_caches_are_told_which_names_changed(self, registry, base_model_dir, adapter_dir):
        calls: list[tuple[list[str], str]] = []
        registry.on_names_changed = lambda names, base: calls.append((names, base))
        for _ in range(2):
            _publish(registry, base_model_dir, adapter_dir)
        assert calls[-1] == (["acme.support@latest"], str(base_model_dir))
        calls.clear()
        registry.set_alias("acme", "support", "production", 1)  # new alias: nothing cached yet
        assert calls == []
        registry.set_alias("acme", "support", "production", 2)  # moved
        registry.delete_alias("acme", "support", "production")
        registry.delete("acme", "support", 2)  # holds latest
        assert [names for names, _ in calls] == [["acme.support@production"], ["acme.support@production"],
                                                 ["acme.support.v2", "acme.support@latest"]]


def test_a_publish_the_catalog_refuses_leaves_no_files(tmp_path, base_model_dir, adapter_dir, monkeypatch):
    """All or nothing: files written, then the catalog fails (a 500): the version folder goes too."""
    registry = open_registry(str(tmp_path / "reg"))

    def broken(*args, **kwargs):
        raise RuntimeError("catalog down")

    monkeypatch.setattr(registry.catalog, "add_version", broken)
    with pytest.raises(RuntimeError, match="catalog down"):
        _publish(registry, base_model_dir, adapter_dir)
    assert registry.store.scan().versions == [] and registry.store.scan().taken == {}
    assert registry.search(status=None)[1] == 0
    monkeypatch.undo()
    assert _publish(registry, base_model_dir, adapter_dir).version == 2  # number 1 stays spent
