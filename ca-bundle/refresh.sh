#!/bin/sh
# refresh.sh - regenerate mozilla-roots.pem and SOURCE from Debian's
# ca-certificates package.
#
# Only the mozilla/ entries selected in /etc/ca-certificates.conf are taken:
# no local additions, no deselected (!) entries. They are written in sorted
# order, each preceded by a "# NAME" line, so the output is stable.
# When the certificates and the package version are unchanged, both files
# are left alone (SOURCE keeps its date).
set -eu

die() { echo "refresh: $*" >&2; exit 1; }

here=$(cd "$(dirname "$0")" && pwd)
conf=/etc/ca-certificates.conf
dir=/usr/share/ca-certificates/mozilla
pem=$here/mozilla-roots.pem
src=$here/SOURCE

sh "$here/../bearssl/deps.sh" ca-certificates
[ -r "$conf" ] || die "cannot read $conf"
version=$(dpkg-query -W -f='${Version}' ca-certificates) ||
	die "cannot get the ca-certificates version"

tmp=$pem.tmp.$$
trap 'rm -f "$tmp" "$src.tmp.$$"' EXIT
: > "$tmp"
sed -n 's|^mozilla/||p' "$conf" | LC_ALL=C sort -u | while IFS= read -r name; do
	case $name in */*|"") die "odd entry in $conf: mozilla/$name" ;; esac
	[ -r "$dir/$name" ] || die "missing $dir/$name"
	printf '# %s\n' "$name"
	cat "$dir/$name"
	[ -z "$(tail -c 1 "$dir/$name")" ] || echo    # end on a newline
done >> "$tmp"

n=$(grep -c -- '-----BEGIN CERTIFICATE-----' "$tmp") || n=0
[ "$n" -gt 0 ] || die "no certificates found via $conf"

if [ -f "$pem" ] && cmp -s "$tmp" "$pem" && [ -f "$src" ] &&
	grep -qxF "Package: ca-certificates $version" "$src"; then
	echo "refresh: $n certificates, unchanged (ca-certificates $version)"
	exit 0
fi

sum=$(sha256sum "$tmp" | cut -d' ' -f1)
cat > "$src.tmp.$$" <<EOF
mozilla-roots.pem: the Mozilla CA roots as shipped by Debian.
Package: ca-certificates $version
Selection: the mozilla/ entries of /etc/ca-certificates.conf, sorted
Generated: $(date -u '+%Y-%m-%d %H:%M:%S UTC') by ca-bundle/refresh.sh
Certificates: $n
SHA-256: $sum
EOF
mv "$tmp" "$pem"
mv "$src.tmp.$$" "$src"
echo "refresh: $n certificates from ca-certificates $version -> $pem"
