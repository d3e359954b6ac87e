#!/usr/bin/env python3
"""Checks of the Helm charts that need no helm binary (run by tests/helm_chart.rs).

  chart_check.py parse FILE...
      Every file parses (YAML, all documents; .json as JSON).
  chart_check.py validate SCHEMA VALUES [--subchart KEY DEFAULTS | --defaults DEFAULTS]
      VALUES validates against the JSON schema SCHEMA. With --subchart, the
      values checked are DEFAULTS (the subchart's values.yaml) coalesced with
      VALUES[KEY], as Helm does for a dependency. With --defaults, they are
      DEFAULTS (the chart's values.yaml) coalesced with VALUES, as
      `helm install -f VALUES` does.
  chart_check.py render VALUES OUTDIR [--enable-policy] [--subchart KEY DEFAULTS | --defaults DEFAULTS]
      Writes what the chart mounts into the pubwarden container (as
      templates/_helpers.tpl renders it) so that `pubwarden check-config` can
      check it: OUTDIR/pubwarden.yaml (settings), OUTDIR/policy.yaml (when a
      policy is enabled) and OUTDIR/env (the PUBWARDEN_* variables, one
      NAME=VALUE a line). Every `file:` secret named in the settings or the
      policy must lie in a directory of `secretMounts`; it is created under
      OUTDIR/root with a placeholder and the path is rewritten to it.
      The `tls:` and `upstream.tls:` sections come from the tls.* and
      upstreamTls.* values as the chart renders them (the chart's refusals
      included); every certificate, key and CA file they name must lie in a
      directory the container mounts (the chart's TLS Secrets, secretMounts,
      volumeMounts), and is created under OUTDIR/root as real PEM: a test CA
      (for every CA file), a server certificate and key signed by it (tls.*),
      and a client certificate and key (upstream.tls.*), made with the openssl
      command (exit status 4 when there is none).
      --enable-policy renders policy.content even when policy.enabled is false.
  chart_check.py values-refs CHART_DIR [--subchart KEY DEFAULTS]
      Every `.Values.a.b` path the chart's templates read exists in its
      values.yaml (or, for KEY, in DEFAULTS): catches typos helm would
      render silently as empty.

Needs PyYAML and jsonschema (Debian: apt-get install python3-yaml python3-jsonschema);
`render` with TLS also needs the openssl command (apt-get install openssl).
"""

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

try:
    import jsonschema
    import yaml
except ImportError as e:  # pragma: no cover - the Rust test turns this into an install hint
    sys.stderr.write(
        f"chart_check.py: {e}; install with: apt-get install -y python3-yaml python3-jsonschema\n"
    )
    sys.exit(3)


SECRETS_DIR = "/etc/pubwarden/secrets"

# templates/_helpers.tpl, "pubwarden.tlsDir" and its siblings.
TLS_DIR = "/etc/pubwarden/tls"
TLS_CLIENT_CA_DIR = "/etc/pubwarden/tls-client-ca"
UPSTREAM_CA_DIR = "/etc/pubwarden/upstream-ca"
UPSTREAM_CLIENT_DIR = "/etc/pubwarden/upstream-client"

# Keys of `tls:` / `upstream.tls:` the chart sets when tls.enabled /
# upstreamTls.enabled (templates/_helpers.tpl, "pubwarden.settings"), and the
# values they come from.
TLS_OWNED = {
    "listen": "tls.port and tls.listenHost (or listenHost)",
    "cert_file": "tls.secretName",
    "key_file": "tls.secretName",
    "client_ca_file": "tls.clientAuth, tls.clientCaSecretName and tls.clientCaKey",
    "client_auth": "tls.clientAuth",
    "only": "tls.only",
}
UPSTREAM_TLS_OWNED = {
    "ca_file": "upstreamTls.caSecretName and upstreamTls.caKey",
    "server_name": "upstreamTls.serverName",
    "cert_file": "upstreamTls.clientCertSecretName",
    "key_file": "upstreamTls.clientCertSecretName",
    "insecure_skip_verify": "upstreamTls.insecureSkipVerify",
}

# Exit status when the openssl command is missing (tests/helm_chart.rs turns
# it into an install hint).
NO_OPENSSL = 4


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
    """subchart: None, (KEY, DEFAULTS) for --subchart, or (None, DEFAULTS)
    for --defaults."""
    values = load_yaml(values_path) or {}
    if subchart:
        key, defaults_path = subchart
        if key is None:
            return coalesce(load_yaml(defaults_path) or {}, values)
        if key not in values:
            sys.exit(f"{values_path}: no `{key}:` section for the subchart")
        return coalesce(load_yaml(defaults_path) or {}, values[key] or {})
    return values


def parse_subchart(args):
    if "--subchart" in args:
        i = args.index("--subchart")
        sub = (args[i + 1], args[i + 2])
        return args[:i] + args[i + 3 :], sub
    if "--defaults" in args:
        i = args.index("--defaults")
        return args[:i] + args[i + 2 :], (None, args[i + 1])
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


def listen_host(v):
    """templates/_helpers.tpl, "pubwarden.listenHost"."""
    return v.get("listenHost") or ("127.0.0.1" if v["mode"] == "sidecar" else "0.0.0.0")


def client_ca_mounted(v):
    """templates/_helpers.tpl, "pubwarden.tlsClientCaMounted"."""
    t = v.get("tls") or {}
    return bool(t.get("enabled") and t.get("clientAuth") != "none" and t.get("clientCaSecretName"))


def validate_tls(v):
    """templates/_helpers.tpl, "pubwarden.validateTls": the chart's `fail`s."""
    problems = []
    t, u = v.get("tls") or {}, v.get("upstreamTls") or {}
    if t.get("enabled"):
        if not t.get("secretName"):
            problems.append(
                "pubwarden: tls.enabled needs tls.secretName, a kubernetes.io/tls Secret "
                "(tls.crt, tls.key; e.g. a cert-manager Certificate's secretName)"
            )
        if not t.get("only") and int(t["port"]) == int(v["ports"]["resp"]):
            problems.append(
                f"pubwarden: tls.port ({int(t['port'])}) must differ from ports.resp, "
                "or set tls.only: true to serve TLS alone"
            )
        if int(t["port"]) == int(v["ports"]["admin"]):
            problems.append(f"pubwarden: tls.port ({int(t['port'])}) must differ from ports.admin")
    if u.get("enabled") and u.get("insecureSkipVerify") and u.get("caSecretName"):
        problems.append(
            "pubwarden: upstreamTls.insecureSkipVerify contradicts upstreamTls.caSecretName "
            "(the CA would not be used); drop one"
        )
    return problems


def chart_settings(v):
    """templates/_helpers.tpl, "pubwarden.settings": (settings, problems)."""
    problems = validate_tls(v)
    settings = copy.deepcopy(v["config"].get("settings") or {})
    shutdown = settings.setdefault("shutdown", {}) or {}
    shutdown["drain_timeout"] = f"{int(v['shutdown']['drainTimeoutSeconds'])}s"
    settings["shutdown"] = shutdown
    t = v.get("tls") or {}
    if t.get("enabled"):
        tls = copy.deepcopy(settings.get("tls") or {})
        for key, source in sorted(TLS_OWNED.items()):
            if key in tls:
                problems.append(
                    f"pubwarden: config.settings.tls.{key} is set by the chart when tls.enabled "
                    f"is true (from {source}); remove it from config.settings"
                )
        host = t.get("listenHost") or listen_host(v)
        tls["listen"] = f"{host}:{int(t['port'])}"
        tls["cert_file"] = f"{TLS_DIR}/tls.crt"
        tls["key_file"] = f"{TLS_DIR}/tls.key"
        if t["clientAuth"] != "none":
            if client_ca_mounted(v):
                tls["client_ca_file"] = f"{TLS_CLIENT_CA_DIR}/{t['clientCaKey']}"
            else:
                tls["client_ca_file"] = f"{TLS_DIR}/ca.crt"
        tls["client_auth"] = t["clientAuth"]
        tls["only"] = bool(t.get("only"))
        settings["tls"] = tls
    u = v.get("upstreamTls") or {}
    if u.get("enabled"):
        upstream = copy.deepcopy(settings.get("upstream") or {})
        if str(upstream.get("address") or "").startswith("redis://"):
            problems.append(
                "pubwarden: upstreamTls.enabled contradicts config.settings.upstream.address "
                "redis://... (plaintext): write rediss://host:port or host:port"
            )
        utls = copy.deepcopy(upstream.get("tls") or {})
        for key, source in sorted(UPSTREAM_TLS_OWNED.items()):
            if key in utls:
                problems.append(
                    f"pubwarden: config.settings.upstream.tls.{key} is set by the chart when "
                    f"upstreamTls.enabled is true (from {source}); remove it from config.settings"
                )
        if u.get("caSecretName"):
            utls["ca_file"] = f"{UPSTREAM_CA_DIR}/{u['caKey']}"
        if u.get("serverName"):
            utls["server_name"] = u["serverName"]
        if u.get("clientCertSecretName"):
            utls["cert_file"] = f"{UPSTREAM_CLIENT_DIR}/tls.crt"
            utls["key_file"] = f"{UPSTREAM_CLIENT_DIR}/tls.key"
        utls["insecure_skip_verify"] = bool(u.get("insecureSkipVerify"))
        upstream["tls"] = utls
        settings["upstream"] = upstream
    return settings, problems


def mounted_dirs(v):
    """Directories the pubwarden container mounts (templates/_helpers.tpl,
    "pubwarden.container"), each ending in "/": {dir: what mounts it}."""
    dirs = {}
    for m in v.get("secretMounts") or []:
        dirs[f"{SECRETS_DIR}/{m['name']}/"] = f"secretMounts {m['name']}"
    for m in v.get("volumeMounts") or []:
        if m.get("mountPath"):
            dirs[m["mountPath"].rstrip("/") + "/"] = f"volumeMounts {m.get('name', '?')}"
    t, u = v.get("tls") or {}, v.get("upstreamTls") or {}
    if t.get("enabled"):
        dirs[f"{TLS_DIR}/"] = f"tls.secretName {t.get('secretName')}"
        if client_ca_mounted(v):
            dirs[f"{TLS_CLIENT_CA_DIR}/"] = f"tls.clientCaSecretName {t['clientCaSecretName']}"
    if u.get("enabled") and u.get("caSecretName"):
        dirs[f"{UPSTREAM_CA_DIR}/"] = f"upstreamTls.caSecretName {u['caSecretName']}"
    if u.get("enabled") and u.get("clientCertSecretName"):
        dirs[f"{UPSTREAM_CLIENT_DIR}/"] = (
            f"upstreamTls.clientCertSecretName {u['clientCertSecretName']}"
        )
    return dirs


# The files of `tls:` and `upstream.tls:`: (section path, key, what goes in it).
TLS_FILES = (
    (("tls",), "cert_file", "server.crt"),
    (("tls",), "key_file", "server.key"),
    (("tls",), "client_ca_file", "ca.crt"),
    (("upstream", "tls"), "ca_file", "ca.crt"),
    (("upstream", "tls"), "cert_file", "client.crt"),
    (("upstream", "tls"), "key_file", "client.key"),
)

OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = pubwarden chart check
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:pubwarden,DNS:localhost,IP:127.0.0.1
authorityKeyIdentifier = keyid
[client]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
subjectAltName = URI:spiffe://chart-check/pubwarden
authorityKeyIdentifier = keyid
"""


def test_pki():
    """A throwaway CA and a server and a client certificate it signed (P-256,
    valid for a week), made with the openssl command: {name: PEM text} for
    ca.crt, server.crt, server.key, client.crt, client.key. Exits with
    NO_OPENSSL when there is no openssl."""
    openssl = shutil.which("openssl")
    if not openssl:
        sys.stderr.write(
            "chart_check.py: the openssl command is not installed; the TLS files the chart "
            "mounts are checked with real certificates made by it. Install it with: "
            "apt-get install -y openssl\n"
        )
        sys.exit(NO_OPENSSL)
    with tempfile.TemporaryDirectory(prefix="pubwarden-chart-pki-") as d:
        cnf = os.path.join(d, "openssl.cnf")
        with open(cnf, "w", encoding="utf-8") as f:
            f.write(OPENSSL_CNF)

        def run(*args):
            out = subprocess.run(
                [openssl, *args],
                cwd=d,
                capture_output=True,
                text=True,
                env={**os.environ, "OPENSSL_CONF": cnf},
                check=False,
            )
            if out.returncode != 0:
                sys.exit(f"chart_check.py: openssl {' '.join(args)} failed:\n{out.stderr}")

        for name in ("ca", "server", "client"):
            run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-out", f"{name}.key")
        run("req", "-config", cnf, "-new", "-x509", "-key", "ca.key", "-subj",
            "/CN=pubwarden chart check CA", "-extensions", "ca", "-days", "7", "-out", "ca.crt")
        for serial, name, cn in ((2, "server", "pubwarden"), (3, "client", "chart-check-client")):
            run("req", "-config", cnf, "-new", "-key", f"{name}.key", "-subj", f"/CN={cn}",
                "-out", f"{name}.csr")
            run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-set_serial", str(serial), "-days", "7", "-extfile", cnf, "-extensions", name,
                "-out", f"{name}.crt")
        pki = {}
        for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key"):
            with open(os.path.join(d, name), encoding="utf-8") as f:
                pki[name] = f.read()
        return pki


def render_tls_files(settings, dirs, root):
    """Writes real PEM files where `tls:` and `upstream.tls:` point and
    rewrites the paths to them; returns the problems."""
    wanted = []
    for section, key, content in TLS_FILES:
        node = settings
        for part in section:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(key), str):
            wanted.append((".".join(section) + "." + key, node, key, content))
    if not wanted:
        return []
    problems = []
    written = {}
    pki = None
    for where, node, key, content in wanted:
        p = node[key]
        if not any(p.startswith(d) for d in dirs):
            problems.append(
                f"config.settings.{where}: {p} is not in a directory the container mounts "
                f"({', '.join(sorted(dirs)) or 'none'}): use the tls.* / upstreamTls.* values, "
                "secretMounts or volumeMounts"
            )
            continue
        if written.get(p, content) != content:
            problems.append(
                f"config.settings.{where}: {p} is also where the chart check puts "
                f"{written[p]}; give each certificate, key and CA its own file"
            )
            continue
        if pki is None:
            pki = test_pki()
        local = os.path.join(root, p.lstrip("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "w", encoding="utf-8") as f:
            f.write(pki[content])
        written[p] = content
        node[key] = local
    return problems


def cmd_render(values_path, outdir, subchart, enable_policy=False):
    v = effective_values(values_path, subchart)
    if enable_policy:
        v["policy"]["enabled"] = True
    os.makedirs(outdir, exist_ok=True)
    root = os.path.join(outdir, "root")
    mounts = {f"{SECRETS_DIR}/{m['name']}/" for m in v.get("secretMounts") or []}

    settings, problems = chart_settings(v)
    if problems:
        print("\n".join(problems))
        return 1
    policy_on = bool(v["policy"].get("enabled") or v["policy"].get("existingConfigMap"))
    policy = None
    if v["policy"].get("enabled"):
        content = v["policy"].get("content") or {}
        # templates/_helpers.tpl, "pubwarden.policy": a string is the file itself.
        policy = yaml.safe_load(content) if isinstance(content, str) else copy.deepcopy(content)

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
    problems += render_tls_files(settings, mounted_dirs(v), root)
    if problems:
        print("\n".join(problems))
        return 1

    with open(os.path.join(outdir, "pubwarden.yaml"), "w", encoding="utf-8") as f:
        yaml.safe_dump(settings, f, sort_keys=False)
    env = {}
    # templates/_helpers.tpl, "pubwarden.listenHost" and "pubwarden.container"
    env["PUBWARDEN_LISTEN"] = f"{listen_host(v)}:{int(v['ports']['resp'])}"
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
    parts = ["settings"]
    if "tls" in settings:
        parts.append("tls listener")
    if isinstance(settings.get("upstream"), dict) and "tls" in settings["upstream"]:
        parts.append("upstream tls")
    if policy is not None:
        parts.append("policy")
    print(f"rendered {outdir}: {', '.join(parts)}")
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
