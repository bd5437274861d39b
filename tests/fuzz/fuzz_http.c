/*
 * fuzz_http: the --metrics request reader. The input is what a client
 * sends, cut into reads at each 0xff byte (so that a head split across
 * reads is exercised); each read goes through the same steps as
 * http_read(): appended to the head, the end looked for (an empty
 * line), and, once it ends or fills the buffer, http_answer(). Checked:
 * a response is always made by then and never before; it is one of the
 * statuses dotp sends, with a Content-Length equal to the body that
 * follows (none for HEAD), and Connection: close.
 */
#define DOTP_NO_MAIN 1
#include "../../dotp.c"
#include "fuzz.h"

/* The engine state /metrics reads: one zone with one server. */
static void
fz_setup(void)
{
	static int done;

	if (done++)
		return;
	log_verbosity = -1;
	G.cfg.max_conns = 1;
	G.nup = G.nzone = 1;
	G.zone[0].n = 1;
	G.zone[0].len = 1;
	memcpy(G.zone[0].text, ".", 2);
	memcpy(G.up[0].label, "127.0.0.1:853", 14);
	G.nconn = 1;
	G.conn = calloc(1, sizeof *G.conn);
	if (G.conn == NULL)
		abort();
	G.conn[0].fd = -1;
	stat_defs_init();
}

/* Checks the response h holds. */
static void
fz_check(const struct httpconn *h)
{
	const char *r = h->out + h->out_off, *end = h->out + h->out_len;
	const char *cl, *body;
	long	 status, n;

	CHECK(h->out_off < h->out_len && h->out_len <= DOTP_HTTP_HEAD_ROOM +
	    DOTP_METRICS_MAX);
	CHECK(strncmp(r, "HTTP/1.1 ", 9) == 0);
	status = strtol(r + 9, NULL, 10);
	CHECK(status == 200 || status == 400 || status == 404 ||
	    status == 405 || status == 431 || status == 503);
	CHECK((cl = memmem(r, (size_t)(end - r), "Content-Length: ", 16)));
	n = strtol(cl + 16, NULL, 10);
	CHECK(memmem(r, (size_t)(end - r), "Connection: close\r\n", 19));
	body = memmem(r, (size_t)(end - r), "\r\n\r\n", 4);
	CHECK(body != NULL);
	body += 4;
	/* HEAD: the head alone; else exactly Content-Length bytes. */
	CHECK(body == end || end - body == n);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct httpconn h;
	size_t	 i = 0, n;

	fz_setup();
	memset(&h, 0, sizeof h);
	h.fd = -1;
	while (i < size && h.out == NULL) {
		for (n = 0; i + n < size && data[i + n] != 0xff; n++)
			;
		if (n > sizeof h.req - 1 - h.have)
			n = sizeof h.req - 1 - h.have;
		memcpy(h.req + h.have, data + i, n);
		h.have += n;
		h.req[h.have] = '\0';
		i += n + 1;
		if (http_head_ends(h.req, h.have))
			http_answer(&h, 1);
		else if (h.have == sizeof h.req - 1)
			http_answer(&h, 0);
		CHECK(h.out != NULL || (!http_head_ends(h.req, h.have) &&
		    h.have < sizeof h.req - 1));
	}
	if (h.out != NULL)
		fz_check(&h);
	free(h.out);
	return 0;
}
