#!/usr/bin/env python3
"""Checks of the Helm charts that need no helm binary (run by tests/helm_chart.rs).

  chart_check.py parse FILE...
      Every file parses (YAML, all documents; .json as JSON).
  chart_check.py validate SCHEMA VALUES [--subchart KEY DEFAULTS]
      VALUES validates against the JSON schema SCHEMA. With --subchart, the
      values checked are DEFAULTS (the subchart's values.yaml) coalesced with
      VALUES[KEY], as Helm does for a dependency.
  chart_check.py render VALUES OUTDIR [--enable-policy] [--subchart KEY DEFAULTS]
      Writes what the chart mounts into the pubwarden container (as
      templates/_helpers.tpl renders it) so that `pubwarden check-config` can
      check it: OUTDIR/pubwarden.yaml (settings), OUTDIR/policy.yaml (when a
      policy is enabled) and OUTDIR/env (the PUBWARDEN_* variables, one
      NAME=VALUE a line). Every `file:` secret named in the settings or the
      policy must lie in a directory of `secretMounts`; it is created under
      OUTDIR/root with a placeholder and the path is rewritten to it.
      --enable-policy renders policy.content even when policy.enabled is false.
  chart_check.py values-refs CHART_DIR [--subchart KEY DEFAULTS]
      Every `.Values.a.b` path the chart's templates read exists in its
      values.yaml (or, for KEY, in DEFAULTS): catches typos helm would
      render silently as empty.

Needs PyYAML and jsonschema (Debian: apt-get install python3-yaml python3-jsonschema).
"""

import copy
import json
import os
import re
import sys

try:
    import jsonschema
    import yaml
except ImportError as e:  # pragma: no cover - the Rust test turns this into an install hint
    sys.stderr.write(
        f"chart_check.py: {e}; install with: apt-get install -y python3-yaml python3-jsonschema\n"
    )
    sys.exit(3)


SECRETS_DIR = "/etc/pubwarden/secrets"


def load_yaml(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def coalesce(defaults, overrides):
    """Helm's coalescing: maps merge recursively, anything else replaces,
    null deletes the default."""
    if not isinstance(defaults, dict) or not isinstance(overrides, dict):
        return copy.deepcopy(overrides)
    out = copy.deepcopy(defaults)
    for k, v in overrides.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = coalesce(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def effective_values(values_path, subchart):
    values = load_yaml(values_path) or {}
    if subchart:
        key, defaults_path = subchart
        if key not in values:
            sys.exit(f"{values_path}: no `{key}:` section for the subchart")
        return coalesce(load_yaml(defaults_path) or {}, values[key] or {})
    return values


def parse_subchart(args):
    if "--subchart" in args:
        i = args.index("--subchart")
        sub = (args[i + 1], args[i + 2])
        return args[:i] + args[i + 3 :], sub
    return args, None


def cmd_parse(files):
    bad = 0
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                if path.endswith(".json"):
                    json.load(f)
                else:
                    list(yaml.safe_load_all(f))
        except Exception as e:  # noqa: BLE001 - report every file
            print(f"{path}: {e}")
            bad += 1
    print(f"parsed {len(files)} file(s), {bad} failed")
    return 1 if bad else 0


def cmd_validate(schema_path, values_path, subchart):
    with open(schema_path, encoding="utf-8") as f:
        schema = json.load(f)
    jsonschema.Draft7Validator.check_schema(schema)
    values = effective_values(values_path, subchart)
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(values),
        key=lambda e: list(map(str, e.path)),
    )
    for e in errors:
        where = ".".join(map(str, e.absolute_path)) or "(root)"
        hint = e.schema.get("description") if isinstance(e.schema, dict) else None
        print(f"{values_path}: {where}: {e.message}" + (f" ({hint})" if hint else ""))
    if errors:
        return 1
    print(f"{values_path}: valid")
    return 0


def secret_files(node, path=""):
    """Yields (key path, dict) for every {file: PATH} mapping in node."""
    if isinstance(node, dict):
        if set(node) == {"file"} and isinstance(node["file"], str):
            yield path, node
        for k, v in node.items():
            yield from secret_files(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from secret_files(v, f"{path}[{i}]")


def cmd_render(values_path, outdir, subchart, enable_policy=False):
    v = effective_values(values_path, subchart)
    if enable_policy:
        v["policy"]["enabled"] = True
    os.makedirs(outdir, exist_ok=True)
    root = os.path.join(outdir, "root")
    mounts = {f"{SECRETS_DIR}/{m['name']}/" for m in v.get("secretMounts") or []}

    # templates/_helpers.tpl, "pubwarden.settings"
    settings = copy.deepcopy(v["config"].get("settings") or {})
    shutdown = settings.setdefault("shutdown", {}) or {}
    shutdown["drain_timeout"] = f"{int(v['shutdown']['drainTimeoutSeconds'])}s"
    settings["shutdown"] = shutdown
    policy_on = bool(v["policy"].get("enabled") or v["policy"].get("existingConfigMap"))
    policy = None
    if v["policy"].get("enabled"):
        content = v["policy"].get("content") or {}
        # templates/_helpers.tpl, "pubwarden.policy": a string is the file itself.
        policy = yaml.safe_load(content) if isinstance(content, str) else copy.deepcopy(content)

    problems = []
    for doc_name, doc in (("config.settings", settings), ("policy.content", policy)):
        for key, entry in secret_files(doc):
            p = entry["file"]
            if not any(p.startswith(m) for m in mounts):
                problems.append(
                    f"{doc_name}.{key}: {p} is not in a secretMounts directory "
                    f"({', '.join(sorted(mounts)) or 'none declared'})"
                )
                continue
            local = os.path.join(root, p.lstrip("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with open(local, "w", encoding="utf-8") as f:
                f.write("placeholder-secret\n")
            entry["file"] = local
    if problems:
        print("\n".join(problems))
        return 1

    with open(os.path.join(outdir, "pubwarden.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(settings, f, sort_keys=False)
    env = {}
    # templates/_helpers.tpl, "pubwarden.listenHost" and "pubwarden.container"
    host = v.get("listenHost") or ("127.0.0.1" if v["mode"] == "sidecar" else "0.0.0.0")
    env["PUBWARDEN_LISTEN"] = f"{host}:{int(v['ports']['resp'])}"
    env["PUBWARDEN_ADMIN_LISTEN"] = f"{v['adminListenHost']}:{int(v['ports']['admin'])}"
    if policy is not None:
        with open(os.path.join(outdir, "policy.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(policy, f, sort_keys=False)
        env["PUBWARDEN_POLICY"] = os.path.join(outdir, "policy.yaml")
    elif policy_on:
        print("policy.existingConfigMap is set: the policy is not in the values, not checked")
    with open(os.path.join(outdir, "env"), "w", encoding="utf-8") as f:
        for k, val in env.items():
            f.write(f"{k}={val}\n")
    print(f"rendered {outdir}: settings{', policy' if policy is not None else ''}")
    return 0


VALUES_REF = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def has_path(values, parts):
    node = values
    for p in parts:
        if not isinstance(node, dict) or p not in node:
            return False
        node = node[p]
    return True


def cmd_values_refs(chart_dir, subchart):
    values = load_yaml(os.path.join(chart_dir, "values.yaml")) or {}
    if subchart:
        key, defaults_path = subchart
        values[key] = coalesce(load_yaml(defaults_path) or {}, values.get(key) or {})
    missing = []
    tdir = os.path.join(chart_dir, "templates")
    count = 0
    for dirpath, _, names in os.walk(tdir):
        for name in sorted(names):
            path = os.path.join(dirpath, name)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            # Template comments, and the literal text NOTES.txt shows users,
            # are not references (blanked, keeping line numbers).
            blank = lambda m: re.sub(r"[^\n]", " ", m.group(0))  # noqa: E731
            text = re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", blank, text, flags=re.S)
            text = re.sub(r'\{\{ "\{\{" \}\}.*?\{\{ "\}\}" \}\}', blank, text)
            for m in VALUES_REF.finditer(text):
                count += 1
                parts = m.group(1).lstrip(".").split(".")
                if not has_path(values, parts):
                    line = text.count("\n", 0, m.start()) + 1
                    missing.append(f"{path}:{line}: .Values{m.group(1)} is not in values.yaml")
    for line in missing:
        print(line)
    print(f"{count} .Values references, {len(missing)} missing")
    return 1 if missing else 0


def main(argv):
    args, subchart = parse_subchart(argv[1:])
    if not args:
        print(__doc__)
        return 2
    cmd, rest = args[0], args[1:]
    if cmd == "parse":
        return cmd_parse(rest)
    if cmd == "validate" and len(rest) == 2:
        return cmd_validate(rest[0], rest[1], subchart)
    if cmd == "render" and len(rest) in (2, 3) and rest[2:] in ([], ["--enable-policy"]):
        return cmd_render(rest[0], rest[1], subchart, enable_policy=rest[2:] == ["--enable-policy"])
    if cmd == "values-refs" and len(rest) == 1:
        return cmd_values_refs(rest[0], subchart)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
