/*
 * fuzz_frames: 2-byte-length frame reassembly (frame_complete) as dotp
 * drives it for TCP clients (tcp_read, max DOTP_QUERY_MAX) and for the
 * TLS plaintext from upstreams (conn_recvapp, max DNS_MSG_MAX).
 *
 * Input: byte 0 gives k = (byte & 15) + 1, the next k bytes are chunk
 * sizes used in turn (0: all that is left, 1..127: that many, 128..255:
 * (b - 127) * 32), the rest is the byte stream. The assembler below is
 * dotp's: a buffer of 2 + max bytes, copy min(room, chunk), dispatch
 * every complete frame, move the rest to the front. It is checked
 * against a one-pass parse of the whole stream: the same frames, same
 * bytes, in the same order, and the same error, whatever the chunking.
 */
#define DOTP_NO_MAIN 1
#include "../../dotp.c"
#include "fuzz.h"

/* The next frame of the whole stream at pos: its size (2 + length),
 * 0 if incomplete, -1 if its length is out of [12, max]. */
static long
ref_frame(const unsigned char *st, size_t stlen, size_t pos, size_t max)
{
	size_t	 flen;

	if (stlen - pos < 2)
		return 0;
	flen = (size_t)st[pos] << 8 | st[pos + 1];
	if (flen < DNS_HEADER_LEN || flen > max)
		return -1;
	return stlen - pos - 2 < flen ? 0 : (long)(2 + flen);
}

static void
assemble(const unsigned char *sizes, size_t nsizes, const unsigned char *st,
    size_t stlen, size_t max)
{
	size_t	 cap = 2 + max, have = 0, off, room, len, pend;
	size_t	 consumed = 0, dispatched = 0, base = 0, ref = 0, k = 0;
	unsigned char *rx = fz_alloc(cap);
	long	 fl = 0, rf;
	int	 err = 0;

	while (consumed < stlen && !err) {
		/* One read (TCP) or one decrypted record (TLS). */
		unsigned b = sizes[k++ % nsizes];

		pend = b == 0 ? stlen - consumed : b < 128 ? b : (b - 127) * 32;
		if (pend > stlen - consumed)
			pend = stlen - consumed;
		while (pend > 0 && !err) {
			room = cap - have;
			/* A full buffer always holds a complete frame, which
			 * was dispatched: there is always room. */
			CHECK(room > 0);
			len = pend < room ? pend : room;
			memcpy(rx + have, st + consumed, len);
			have += len;
			consumed += len;
			pend -= len;
			off = 0;
			while ((fl = frame_complete(rx + off, have - off,
			    DNS_HEADER_LEN, max)) > 0) {
				/* The frame the whole-stream parse sees next. */
				CHECK((size_t)fl >= 2 + DNS_HEADER_LEN &&
				    (size_t)fl <= 2 + max);
				CHECK(off + (size_t)fl <= have);
				CHECK(base + off == ref);
				rf = ref_frame(st, stlen, ref, max);
				CHECK(rf == fl);
				CHECK(memcmp(rx + off, st + ref, (size_t)fl) == 0);
				ref += (size_t)fl;
				dispatched += (size_t)fl;
				off += (size_t)fl;
			}
			if (fl < 0) {
				/* Bad length: the stream is dropped here. */
				CHECK(base + off == ref);
				CHECK(ref_frame(st, stlen, ref, max) < 0);
				CHECK(dispatched + (have - off) == consumed);
				err = 1;
				break;
			}
			memmove(rx, rx + off, have - off);
			have -= off;
			base += off;
			CHECK(dispatched + have == consumed);
		}
	}
	/* All of the stream read: what is left is an incomplete frame. */
	if (!err) {
		CHECK(consumed == stlen && base + have == stlen);
		CHECK(ref_frame(st, stlen, ref, max) == 0);
	}
	free(rx);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	size_t	 nsizes;

	if (size < 1)
		return 0;
	nsizes = (size_t)(data[0] & 15) + 1;
	if (size < 1 + nsizes)
		return 0;
	assemble(data + 1, nsizes, data + 1 + nsizes, size - 1 - nsizes,
	    DOTP_QUERY_MAX);
	assemble(data + 1, nsizes, data + 1 + nsizes, size - 1 - nsizes,
	    DNS_MSG_MAX);
	return 0;
}
