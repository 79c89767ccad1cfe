#!/usr/bin/env bash
# The web demo's browser test drives Debian's chromium + chromedriver (no browser download at test
# time). Install them when they are missing and this machine can (root or passwordless sudo, apt);
# otherwise write why not to $1, which the test reads to skip with that reason.
set -u
reason_file=${1:-.venv/.browser-missing}
rm -f "$reason_file"
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "no /usr/bin/chromium and no apt-get to install it (install chromium and chromedriver by hand)" > "$reason_file"
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    sudo=""
elif sudo -n true 2>/dev/null; then
    sudo="sudo -n"
else
    echo "no /usr/bin/chromium, and installing it needs root: sudo apt-get install -y chromium chromium-driver" > "$reason_file"
    exit 0
fi
echo "installing Debian's chromium and chromium-driver for tests/test_serve.py" >&2
if ! { $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium chromium-driver; } >/tmp/install_browser.log 2>&1; then
    echo "apt-get install chromium chromium-driver failed (see /tmp/install_browser.log): $(tail -1 /tmp/install_browser.log)" > "$reason_file"
fi
exit 0
