#!/bin/sh
# What the test suite drives besides qwick: the official OpenAI client and a JSON-schema
# validator (PyPI), headless Chromium with its driver (Debian) for the chat page test, and
# Mesa's Vulkan drivers (Debian: lavapipe, a Vulkan device on the CPU) for the GPU tests.
# Run by the README's test command; installs only what is missing.
set -e
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo -n"; fi
if ! ls /usr/share/vulkan/icd.d/lvp_icd.*.json >/dev/null 2>&1; then
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
        --no-install-recommends mesa-vulkan-drivers; } >/dev/null 2>&1 \
        || echo "warning: could not install mesa-vulkan-drivers; the GPU tests will be skipped" >&2
fi
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
        --no-install-recommends chromium chromium-driver; } >/dev/null 2>&1 \
        || echo "warning: could not install chromium and chromium-driver; the chat page test will be skipped" >&2
fi
python3 -m pip install -q -r "$(dirname "$0")/requirements-test.txt"
