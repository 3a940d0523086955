"""Deterministic scanner-shaped layer scan records, for benchmarks and simulations.

The NeuVector scanner caches one ``LayerRecord`` per layer (cvetools/scan_cache.go), Go's JSON of::

    {"modules": {"Size": <layer bytes>, "Pkgs": {<path>: <base64>}, "Apps": {<path>: [AppPackage]}},
     "secret_logs": {"secrets": [CLUSSecretLog], "set_ids": [CLUSSetIdPermLog]},
     "files": [<every file and directory of the layer>], "removed_file": [<opaque whiteout dirs>]}

Imitated because it decides how the bytes compress: fields in declaration order, empty slices left
out (omitempty), map keys sorted, []byte as base64 (the filtered dpkg status, apk P:/V:/o: lines,
rpm list as JSON), ``<>&`` escaped, ``files`` in Go map order (shuffled). Names come from one
vocabulary (``scanvocab.txt``), popular packages likelier, so they recur across records as on a
node. Checked against real, shuffled file lists (a Debian machine's dpkg lists, a pip-installed
tree): OS layers gzip 4-5x and pip/npm layers 7-9x, as those real lists do.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

Rec = Dict[str, Any]
Apps = Dict[str, List[Dict[str, str]]]
PathGen = Callable[[random.Random], str]


def _load_vocabulary() -> Dict[str, List[List[str]]]:
    sections: Dict[str, List[List[str]]] = {}
    current: List[List[str]] = []
    verbatim = False
    for line in Path(__file__).with_name("scanvocab.txt").read_text().splitlines():
        if line.startswith("["):
            current, verbatim = sections.setdefault(line.strip("[]"), []), line.endswith("-os-release]")
        elif line and not line.startswith("#"):
            current.append([line] if verbatim else line.split())
    return sections


_VOCAB = _load_vocabulary()
_WORDS = [w for row in _VOCAB["words"] for w in row]
_LANGS = _VOCAB["langs"][0]
_EXTS = _VOCAB["extensions"][0]
_OS_FILES = {d: [row[0] for row in _VOCAB[f"{d}-paths"]] for d in ("deb", "apk", "rpm")}
_OS_RELEASE = {d: (rows[0][0], "".join(row[0] + "\n" for row in rows[1:]))
               for d, rows in ((d, _VOCAB[f"{d}-os-release"]) for d in ("deb", "apk", "rpm"))}
_STATUS_PATH = {"deb": "var/lib/dpkg/status", "apk": "lib/apk/db/installed", "rpm": "var/lib/rpm/rpmdb.sqlite"}
_STATUS_BYTES = {"deb": 107, "apk": 60, "rpm": 67}  # base64 bytes one package adds to the database
_APP_BYTES = {"py": 230, "npm": 150, "jar": 200, "go": 110}  # JSON bytes one Apps entry adds
_SETUID = [("setuid", b, "urwxr-xr-x") for b in "chfn chsh gpasswd newgrp passwd su mount umount".split()] + \
          [("setgid", b, "grwxr-xr-x") for b in ("chage", "expiry")]  # Go's FileMode.String of 04755 / 02755
_SECRETS = [("privatekey", "-----BEGIN RSA PRIVATE KEY-----", "{r}/certs/server.key", "Private.Key",
             "Please remove the file if it is not necessary"),
            ("regular", "password: '{h}'", "{r}/config/settings.yaml", "Credential",
             "Please cloak your password and secret key")]
_OPAQUE = ["/var/lib/apt/lists", "/var/cache/apt/archives/partial", "/tmp", "/root/.cache", "/var/cache/apk",
           "/usr/share/doc"]


def _go_json(obj: Any) -> str:
    """encoding/json's bytes: compact, and HTML-safe like Go's default encoder."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _drift(rng: random.Random, version: str, p: float = 0.25) -> str:
    """Another image pinned an older release: lower the last number, keeping the version's shape."""
    head, sep, tail = version.rpartition(".")
    if sep and tail.isdigit() and rng.random() < p:
        return f"{head}.{rng.randint(0, int(tail))}"
    return version


def _words(rng: random.Random, n: int = 1) -> str:
    return rng.choice("_-.").join(rng.choice(_WORDS) for _ in range(n))


def _popular(rng: random.Random, rows: List[List[str]], n: int) -> List[List[str]]:
    """n distinct rows, earlier (more popular) ones likelier: Zipf-like weights, sampled without replacement."""
    keyed = sorted(range(len(rows)), key=lambda i: -rng.random() ** (i + 1) ** 0.8)
    return [rows[i] for i in sorted(keyed[: max(0, n)])]


def _status(distro: str, rows: List[List[str]], rng: random.Random) -> str:
    """The package database as the scanner keeps it: only the lines (or fields) it reads."""
    if distro == "deb":  # dpkg keeps its status sorted by package name
        return "".join(f"Package: {r[0]}\nStatus: install ok installed\n" + (f"Source: {r[2]}\n" if len(r) > 2 else "")
                       + f"Version: {_drift(rng, r[1], 0.05)}\n\n" for r in sorted(rows))
    if distro == "apk":
        return "".join(f"P:{r[0]}\nV:{r[1]}\no:{r[2] if len(r) > 2 else r[0]}\n\n" for r in rows)
    return _go_json([{"n": r[0], "e": int(r[1]), "v": r[2], "r": r[3]} for r in rows])


def _app(app: str, module: str, version: str, file_name: str) -> Dict[str, str]:
    return {"app_name": app, "module_name": module, "version": version, "file_name": file_name}


def _templated(templates: List[str], **fixed: str) -> PathGen:
    return lambda g: g.choice(templates).format(w=_words(g), w2=_words(g, 2), n=g.randint(0, 9), x=g.choice(_EXTS),
                                                **fixed)


def _os_paths(distro: str, names: List[str]) -> PathGen:
    def path(g: random.Random) -> str:
        p = g.choice(names)
        return g.choice(_OS_FILES[distro]).format(p=p, b=p.split("-")[0].replace("lib", "", 1) or p, n=g.randint(0, 9),
                                                  lang=g.choice(_LANGS), w=_words(g), w2=_words(g, 2), x=g.choice(_EXTS))
    return path


def _apps(lang: str, rng: random.Random, n: int, root: str) -> Tuple[Apps, List[PathGen]]:
    """n packages of one ecosystem as the scanner's Apps map, and generators of their files' paths."""
    rows = _popular(rng, _VOCAB[lang], n)
    apps: Apps = {}
    gens: List[PathGen] = []
    for row in rows:
        name, version = row[0], _drift(rng, row[1])
        if lang == "py":  # the scanner trims the path with TrimRight, a cutset; rstrip does the same
            dist = f"{root}/{name}-{version}.dist-info"
            trimmed = dist.rstrip(".egg-info/PKG-INFO").rstrip(".dist-info/WHEEL")
            apps[f"{dist}/WHEEL"] = [_app("python", f"python:{name}", version, trimmed)]
            gens.append(_templated(["{d}/METADATA", "{d}/RECORD", "{d}/INSTALLER", "{d}/top_level.txt",
                                    "{m}/__init__.py", "{m}/{w}.py", "{m}/__pycache__/{w}.cpython-311.pyc",
                                    "{m}/{w}/{w2}.py", "{m}/{w}/__pycache__/{w2}.cpython-311.pyc"],
                                   d="/" + dist, m=f"/{root}/{row[2] if len(row) > 2 else name}"))
        elif lang == "npm":
            key = f"{root}/{name}/package.json"
            apps[key] = [_app("npm", name, version, key)]
            gens.append(_templated(["{m}/package.json", "{m}/index.js", "{m}/README.md", "{m}/LICENSE",
                                    "{m}/lib/{w}.js", "{m}/dist/{w}.js", "{m}/{w}.d.ts", "{m}/lib/{w}/{w2}.js"],
                                   m=f"/{root}/{name}"))
        elif lang == "jar":  # an extracted Spring Boot jar: the scanner opens every library jar
            key = f"{root}/{name.split(':')[1]}-{version}.jar"
            apps[key] = [_app("jar", name, version, key)] * (2 if rng.random() < 0.2 else 1)  # pom and manifest
        else:
            apps.setdefault(root, []).append(_app("golang", f"go:{name}", version.lstrip("v"), root))
    if lang == "jar":
        jars = sorted(apps)
        gens.append(lambda g: "/" + g.choice(jars))
    return apps, gens


def _build(kind: str, rng: random.Random, budget: int) -> Tuple[Rec, Rec, List[str], List[PathGen]]:
    """modules, secret_logs, removed_file and file-path generators for one layer of this kind."""
    pkgs: Dict[str, str] = {}
    apps: Apps = {}
    secrets: Rec = {}
    root = rng.choice(["/app", "/usr/src/app", "/opt/app", "/srv", "/var/www/html"])
    gens = [_templated(["{r}/src/{w}.py", "{r}/src/{w}/{w2}.{x}", "{r}/lib/{w}.ts", "{r}/templates/{w}.html",
                        "{r}/config/{w}.yaml", "{r}/migrations/{n}{n}{n}{n}_{w2}.sql", "{r}/tests/test_{w}.py",
                        "{r}/static/css/{w}.css", "{r}/public/{w}.json"], r=root),
            lambda g: f"{root}/static/js/{_words(g)}.{g.getrandbits(32):08x}.chunk.js"]
    if kind == "meta":
        gens = [_templated(["/docker-entrypoint.sh", "/entrypoint.sh", "/etc/localtime", "/etc/passwd", "/root/.bashrc",
                            "/etc/nginx/conf.d/default.conf", "/etc/ssl/certs/ca-certificates.crt", "/app/{w}.conf",
                            "/usr/local/bin/{w}", "/docker-entrypoint.d/{n}-{w}.sh", "/home/app/.{w}",
                            "/etc/{w}/{w2}.yaml"])]
    if kind in ("py", "npm", "jar") or (kind == "app" and budget > 600 and rng.random() < 0.4):
        lang = "go" if kind == "app" else kind
        where = {"py": f"usr/local/lib/python3.{rng.choice([9, 11, 12])}/site-packages", "jar": "app/BOOT-INF/lib",
                 "npm": rng.choice(["usr/src/app/node_modules", "app/node_modules",
                                    "usr/local/lib/node_modules/npm/node_modules"]),
                 "go": f"usr/local/bin/{_words(rng)}"}[lang]
        apps, app_paths = _apps(lang, rng, max(1, budget // _APP_BYTES[lang]), where)
        gens = app_paths + gens
    elif kind.startswith("os"):
        # an Alpine base is small (~500 paths); a large base layer is Debian's or UBI's
        odds = [55, 25, 20] if kind == "os-pkg" or budget < 20_000 else [65, 0, 35]
        distro = rng.choices(["deb", "apk", "rpm"], odds)[0] if budget > 12000 else "apk"
        base, more = _VOCAB[f"{distro}-base"], _VOCAB[f"{distro}-extra"]
        per = _STATUS_BYTES[distro]
        room = (budget - len(base) * per) // per if kind == "os-pkg" else rng.randint(0, 3)
        extra = _popular(rng, more, room)
        pkgs[_STATUS_PATH[distro]] = _b64(_status(distro, base + extra, rng))
        if kind == "os-base":
            pkgs[_OS_RELEASE[distro][0]] = _b64(_OS_RELEASE[distro][1])
            if distro == "deb":
                secrets["set_ids"] = [{"types": t, "path": f"/usr/bin/{b}", "evidence": e} for t, b, e in _SETUID]
        names = [r[0] for r in (extra if kind == "os-pkg" and extra else base)]
        gens = [_os_paths(distro, names)]
    if kind in ("app", "py", "npm") and rng.random() < 0.03:
        typ, text, path, desc, hint = rng.choice(_SECRETS)
        text = text.format(h=f"{rng.getrandbits(128):032x}")
        secrets["secrets"] = [{"type": typ, "secret": text, "line": text, "path": path.format(r=root),
                               "rule_desc": desc, "suggestion": hint}]
    removed = rng.sample(_OPAQUE, rng.randint(1, 2)) if kind in ("os-pkg", "app") and rng.random() < 0.08 else []
    lo, hi = {"meta": (1, 6e4), "app": (1e4, 5e7), "os-base": (7e7, 2.5e8)}.get(kind, (1e6, 3e8))  # layer bytes
    size = 0 if kind == "meta" and rng.random() < 0.3 else int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    return {"Size": size, "Pkgs": dict(sorted(pkgs.items())), "Apps": dict(sorted(apps.items()))}, secrets, removed, gens


def _kind(rng: random.Random, target: int) -> str:
    table = ([("meta", 90), ("app", 10)] if target < 400 else
             [("meta", 35), ("app", 30), ("py", 15), ("npm", 15), ("jar", 5)] if target < 4000 else
             [("app", 20), ("py", 25), ("npm", 25), ("jar", 10), ("os-pkg", 10), ("os-base", 10)] if target < 30_000 else
             [("py", 10), ("npm", 15), ("jar", 10), ("os-pkg", 35), ("os-base", 30)] if target < 120_000 else
             [("npm", 10), ("os-pkg", 40), ("os-base", 50)])
    return rng.choices([k for k, _ in table], [w for _, w in table])[0]


def _natural_size(rng: random.Random) -> int:
    """Most layers are small (config, a COPY of a few files); a few carry a package database."""
    lo, hi = rng.choices([(70, 400), (400, 4000), (4000, 30_000), (30_000, 120_000), (120_000, 300_000)],
                         [40, 30, 17, 10, 3])[0]
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def scan_record(layer_id: str, target_size: Optional[int] = None, seed: int = 0) -> bytes:
    """The record the scanner would cache for this layer; deterministic in (layer_id, seed).

    With ``target_size`` the JSON comes within 8 bytes of it whenever the layer's fixed part (its
    package database, say) fits; a target below ~80 bytes gives the smallest, ``{}``-ish record.
    Without it the size is drawn from the natural mix (see :func:`record_set`).
    """
    rng = random.Random(f"nvcache-scanrecord:{seed}:{layer_id}")
    target = _natural_size(rng) if target_size is None else max(0, int(target_size))
    kind = _kind(rng, target)
    share = {"meta": 0.0, "app": 0.35}.get(kind, rng.uniform(0.3, 0.7))
    modules, secrets, removed, gens = _build(kind, rng, int(target * share))
    head: Rec = {"modules": modules, "secret_logs": secrets}
    tail: Rec = {"removed_file": removed} if removed else {}
    size = len(_go_json({**head, **tail})) + len(',"files":[]') - 1  # -1: the first entry needs no comma
    files: List[str] = []
    dirs: List[str] = []
    seen = set()
    misses = 0
    while target - size >= 8:  # 8: the JSON of the shortest entry, ',"/abcd"'
        gap = target - size
        if misses < 50 and gap >= 48:
            parts = rng.choice(gens)(rng).strip("/").split("/")  # the scanner lists directories too
            chain = [p for p in ("/" + "/".join(parts[: i + 1]) for i in range(len(parts))) if p not in seen]
            if not chain or sum(len(p) + 3 for p in chain) > gap:
                misses += 1
                continue
            dirs.extend(chain[:-1])
        else:  # close the gap with one file whose name has the right length
            take = min(gap, 90) - 3
            parent = rng.choice([d for d in dirs if len(d) + 5 <= take] or [""])
            chain = [f"{parent}/{_words(rng, 16)}"[:take]]
            if chain[0] in seen:
                continue
        misses = 0
        seen.update(chain)
        files.extend(chain)
        size += sum(len(p) + 3 for p in chain)
    rng.shuffle(files)  # Go builds the list by walking a map
    return _go_json({**head, **({"files": files} if files else {}), **tail}).encode()


def record_set(n: int, seed: int = 0) -> List[Tuple[str, bytes]]:
    """n (layer_id, record) pairs in the natural mix: 40% under 400 B, 30% under 4 KB, 3% over 120 KB."""
    ids = ["sha256:" + hashlib.sha256(f"nvcache-layer:{seed}:{i}".encode()).hexdigest() for i in range(n)]
    return [(layer_id, scan_record(layer_id, None, seed)) for layer_id in ids]


def incompressible_record(layer_id: str, size: int) -> bytes:
    """size random bytes, deterministic in layer_id: the worst case for every codec."""
    return hashlib.shake_256(f"nvcache-incompressible:{layer_id}".encode()).digest(max(0, size))
