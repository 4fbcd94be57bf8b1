#!/usr/bin/env bash
# The digests of the Docker bases, as `--build-arg` flags for `docker build`:
#   docker build -f docker/Dockerfile.gpu $(docker/base-digests.sh docker/Dockerfile.gpu) -t ghcr.io/ddm-project/ddm:0.2.0-gpu .
# Each Dockerfile names its base as `FROM <image>:<tag>@${<ARG>}`, the ARG without a default. The
# digests are recorded in docker/base-digests.txt ("<image>:<tag> sha256:<64 hex>", one a line), so
# every build of a release starts from the same bytes. Record them (needs docker and the network),
# check the diff and commit the file:
#   docker/base-digests.sh --resolve
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
record="${DDM_BASE_DIGESTS:-$here/base-digests.txt}"

bases() {  # "<image>:<tag> <ARG>" for each base of the given Dockerfiles
  sed -nE 's/^FROM ([^@ ]+)@\$\{([A-Za-z_][A-Za-z0-9_]*)\}.*/\1 \2/p' "$@"
}

if [[ "${1:-}" == "--resolve" ]]; then
  out="$(mktemp)"
  {
    echo '# The digests of the Docker bases (docker/Dockerfile.*): "<image>:<tag> sha256:<64 hex>", one a line.'
    echo "# Written by \`docker/base-digests.sh --resolve\` on $(date -u +%Y-%m-%d); read by \`docker/base-digests.sh <Dockerfile>\`."
  } > "$out"
  bases "$here"/Dockerfile.* | sort -u | while read -r image _; do
    digest="$(docker buildx imagetools inspect "$image" | awk '$1 == "Digest:" {print $2; exit}')"
    if ! [[ "$digest" =~ ^sha256:[0-9a-f]{64}$ ]]; then
      echo "docker/base-digests.sh: could not resolve the digest of $image (got '$digest')" >&2
      exit 1
    fi
    echo "$image $digest" >> "$out"
  done
  mv "$out" "$record"
  cat "$record"
  exit 0
fi

dockerfile="${1:?usage: docker/base-digests.sh <Dockerfile> (prints its --build-arg flags) | --resolve}"
flags=""
while read -r image arg; do
  digest="$(awk -v image="$image" '$1 == image {print $2}' "$record" 2>/dev/null | tail -n 1)"
  if ! [[ "$digest" =~ ^sha256:[0-9a-f]{64}$ ]]; then
    echo "docker/base-digests.sh: no digest of $image is recorded in $record; run docker/base-digests.sh" \
      "--resolve (needs docker and the network), check the diff and commit the file" >&2
    exit 1
  fi
  flags+="--build-arg $arg=$digest "
done < <(bases "$dockerfile")
echo "${flags% }"
