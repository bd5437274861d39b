/*
 * fuzz_config: the value parsers behind the command line and the
 * environment. The input, NUL-terminated, goes to parse_addr(),
 * parse_int(), valid_cert_name() and parse_cidr(), and what they accept
 * is checked: an address prints and parses back to itself, a number
 * prints back, a prefix has its host bits clear, matches its own
 * addresses and no others; a pin prints back to itself, and a server
 * (parse_server, with @ pins) keeps its rules. cfg_parse() is not
 * called (it exits).
 */
#define DOTP_NO_MAIN 1
#include "../../dotp.c"
#include "fuzz.h"

static void
check_addr(const char *s)
{
	struct sockaddr_text a, b;

	if (parse_addr(s, 53, &a) < 0)
		return;
	if (a.u.sa.sa_family == AF_INET)
		CHECK(a.len == sizeof a.u.sin);
	else
		CHECK(a.u.sa.sa_family == AF_INET6 && a.len == sizeof a.u.sin6);
	CHECK(a.text[0] != '\0' && strlen(a.text) < sizeof a.text);
	/* The text form (as logged) parses back to the same address; the
	 * default port does not matter, the text always has one. */
	CHECK(parse_addr(a.text, 853, &b) == 0);
	CHECK(b.len == a.len && memcmp(&a.u, &b.u, a.len) == 0);
	CHECK(strcmp(a.text, b.text) == 0);
}

static void
check_int(const char *s)
{
	char	 t[32];
	long	 v = -1, w = -1;

	if (parse_int(s, 0, 600000, &v) < 0)
		return;
	CHECK(v >= 0 && v <= 600000);
	snprintf(t, sizeof t, "%ld", v);
	CHECK(parse_int(t, 0, 600000, &w) == 0 && w == v);
}

static void
check_cert_name(const char *s)
{
	size_t	 n = strlen(s), i;

	if (!valid_cert_name(s))
		return;
	CHECK(n >= 1 && n <= 253 && s[0] != '.');
	for (i = 0; i < n; i++)
		CHECK(strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
		    "0123456789-_.", s[i]) != NULL || (s[i] == '*' && i == 0));
}

static const unsigned char mapped[12] = {
	0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff
};

/* A socket address of family fam for address bytes a. */
static void
mk_sockaddr(int fam, const unsigned char *a, struct sockaddr_storage *ss)
{
	memset(ss, 0, sizeof *ss);
	ss->ss_family = (sa_family_t)fam;
	if (fam == AF_INET)
		memcpy(&((struct sockaddr_in *)ss)->sin_addr, a, 4);
	else
		memcpy(&((struct sockaddr_in6 *)ss)->sin6_addr, a, 16);
}

/* What cidr_match() should say, bit by bit: a v4-mapped IPv6 address
 * (a client of a dual-stack listener) counts as IPv4. */
static int
ref_match(const struct cidr *c, int fam, const unsigned char *a)
{
	int	 k;

	if (fam == AF_INET6 && memcmp(a, mapped, 12) == 0) {
		fam = AF_INET;
		a += 12;
	}
	if (fam != c->family)
		return 0;
	for (k = 0; k < c->bits; k++)
		if ((a[k / 8] ^ c->addr[k / 8]) & (0x80 >> (k % 8)))
			return 0;
	return 1;
}

/* cidr_match() against ref_match() for address a of family fam. */
static int
match(const struct cidr *c, int fam, const unsigned char *a)
{
	struct sockaddr_storage ss;
	int	 r;

	mk_sockaddr(fam, a, &ss);
	r = cidr_match(c, (struct sockaddr *)&ss);
	CHECK(r == ref_match(c, fam, a));
	return r;
}

static void
check_cidr(const char *s, const struct sockaddr_text *pa)
{
	struct cidr c, d;
	struct sockaddr_storage ss;
	char	 text[INET6_ADDRSTRLEN + 8], host[INET6_ADDRSTRLEN + 1];
	unsigned char full[16] = { 0 }, b[16];
	size_t	 hl = strcspn(s, "/");
	int	 max, k;

	if (parse_cidr(s, &c) < 0)
		return;
	CHECK(c.family == AF_INET || c.family == AF_INET6);
	max = c.family == AF_INET ? 32 : 128;
	CHECK(c.bits >= 0 && c.bits <= max);
	/* Host bits, and bytes past the family's address, are zero. */
	for (k = c.bits; k < 128; k++)
		CHECK(!(c.addr[k / 8] & (0x80 >> (k % 8))));
	/* The text form parses back to the same prefix. */
	inet_ntop(c.family, c.addr, host, sizeof host);
	snprintf(text, sizeof text, "%s/%d", host, c.bits);
	CHECK(parse_cidr(text, &d) == 0);
	CHECK(d.family == c.family && d.bits == c.bits &&
	    memcmp(d.addr, c.addr, 16) == 0);
	/* The address as written, host bits and all, is in the prefix
	 * (unless it is v4-mapped IPv6: dotp takes such a client as IPv4,
	 * so no IPv6 prefix matches it). */
	CHECK(hl < sizeof host);
	memcpy(host, s, hl);
	host[hl] = '\0';
	CHECK(inet_pton(c.family, host, full) == 1);
	CHECK(match(&c, c.family, full) ==
	    (c.family == AF_INET || memcmp(full, mapped, 12) != 0));
	/* Flipping one bit: in iff it is a host bit (same caveat). */
	k = (int)(strlen(s) * 7 % (size_t)max);
	memcpy(b, full, 16);
	b[k / 8] ^= (unsigned char)(0x80 >> (k % 8));
	CHECK(match(&c, c.family, b) == (k >= c.bits &&
	    (c.family == AF_INET || memcmp(b, mapped, 12) != 0)));
	/* An IPv4 address in its v4-mapped form is taken as IPv4; any
	 * other address of the other family never matches. */
	if (c.family == AF_INET) {
		memcpy(b, mapped, 12);
		memcpy(b + 12, full, 4);
		CHECK(match(&c, AF_INET6, b) == 1);
		b[10] = 0;
		CHECK(match(&c, AF_INET6, b) == 0);
	} else {
		CHECK(match(&c, AF_INET, full) == 0);
	}
	memset(&ss, 0, sizeof ss);
	ss.ss_family = AF_UNIX;
	CHECK(cidr_match(&c, (struct sockaddr *)&ss) == 0);
	/* And whatever parse_addr() made of the same text. */
	if (pa != NULL)
		CHECK(cidr_match(&c, &pa->u.sa) ==
		    ref_match(&c, pa->u.sa.sa_family, pa->u.sa.sa_family ==
		    AF_INET ? (const unsigned char *)&pa->u.sin.sin_addr :
		    pa->u.sin6.sin6_addr.s6_addr));
}

/* A pin accepted prints back (pin_text) to the text it came from. */
static void
check_pin(const char *s)
{
	unsigned char p[32];
	char	 t[52];

	if (pin_parse(s, p) < 0)
		return;
	pin_text(p, t);
	CHECK(strncmp(t, "sha256/", 7) == 0 && strcmp(t + 7, s) == 0);
}

/* A server accepted keeps the rules of its pins, each of which is in
 * the text as given. */
static void
check_server(const char *s)
{
	struct server sv;
	char	 t[52];
	int	 k;

	if (parse_server(s, 1, &sv) != NULL)
		return;
	CHECK(sv.npin <= DOTP_MAX_PINS);
	CHECK(!sv.no_name || sv.pin_only);
	CHECK(!sv.pin_only || sv.npin > 0);
	CHECK(!sv.plain || (sv.npin == 0 && sv.name[0] == '\0'));
	CHECK(sv.plain || valid_cert_name(sv.name));
	for (k = 0; k < sv.npin; k++) {
		pin_text(sv.pin[k], t);
		CHECK(strstr(s, t) != NULL);
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char	*s = (char *)fz_alloc(size + 1);
	struct sockaddr_text pa;
	int	 have_pa;

	memcpy(s, data, size);
	s[size] = '\0';
	check_addr(s);
	check_int(s);
	check_cert_name(s);
	check_pin(s);
	check_server(s);
	have_pa = parse_addr(s, 53, &pa) == 0;
	check_cidr(s, have_pa ? &pa : NULL);
	free(s);
	return 0;
}
