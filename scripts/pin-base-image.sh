#!/usr/bin/env bash
# Pin the Dockerfile's base image to the digest its tag points at now, so that every later build
# starts from the same bytes: resolves the tag in the Dockerfile's FROM line in the registry and
# writes the digest into `ARG RAY_IMAGE_DIGEST=...`. Run once (and again only to move to a new
# base), then commit the Dockerfile. Needs Docker with buildx, or DOCKERFILE=path for another file.
#   scripts/pin-base-image.sh
set -euo pipefail
cd "$(dirname "$0")/.."
dockerfile=${DOCKERFILE:-Dockerfile}
image=$(sed -n 's/^FROM \([^@ ]*\)@\${RAY_IMAGE_DIGEST}.*/\1/p' "$dockerfile")
if [ -z "$image" ]; then
  echo "no 'FROM <image>@\${RAY_IMAGE_DIGEST}' line in $dockerfile" >&2
  exit 1
fi
digest=$(docker buildx imagetools inspect "$image" | awk '$1 == "Digest:" {print $2; exit}')
if ! [[ $digest =~ ^sha256:[0-9a-f]{64}$ ]]; then
  echo "could not resolve the digest of $image (got '$digest')" >&2
  exit 1
fi
sed -i "s|^ARG RAY_IMAGE_DIGEST.*|ARG RAY_IMAGE_DIGEST=$digest|" "$dockerfile"
echo "$dockerfile: FROM $image@$digest"
