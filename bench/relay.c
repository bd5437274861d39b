/*
 * bench/relay.c - the least a forwarder can add: a blocking UDP relay with
 * one query in flight, no parsing, no TLS. The benchmark puts it between
 * the light-load client and the upstream's plain UDP port; what it adds
 * over querying that port directly is the cost of the extra hop itself
 * (two more sends, two more wake-ups) on this machine.
 *
 *   relay LISTEN_PORT UPSTREAM_PORT     (both on 127.0.0.1)
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/types.h>

int
main(int argc, char *argv[])
{
	struct timeval tv = { 1, 0 };
	struct sockaddr_in a, c;
	socklen_t cl;
	unsigned char b[65536];
	ssize_t	 n;
	int	 l, u;

	if (argc != 3)
		return 2;
	l = socket(AF_INET, SOCK_DGRAM, 0);
	u = socket(AF_INET, SOCK_DGRAM, 0);
	memset(&a, 0, sizeof a);
	a.sin_family = AF_INET;
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	a.sin_port = htons((unsigned short)atoi(argv[1]));
	if (l < 0 || u < 0 || bind(l, (struct sockaddr *)&a, sizeof a) < 0)
		return 1;
	a.sin_port = htons((unsigned short)atoi(argv[2]));
	if (connect(u, (struct sockaddr *)&a, sizeof a) < 0 ||
	    setsockopt(u, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0)
		return 1;
	for (;;) {
		cl = sizeof c;
		n = recvfrom(l, b, sizeof b, 0, (struct sockaddr *)&c, &cl);
		if (n <= 0 || send(u, b, (size_t)n, 0) != n)
			continue;
		n = recv(u, b, sizeof b, 0);	/* or times out after 1 s */
		if (n > 0)
			(void)sendto(l, b, (size_t)n, 0, (struct sockaddr *)&c, cl);
	}
}
