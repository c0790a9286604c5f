/* lbclient: the client of benchmarks/service_lb.
 *
 *   lbclient SECONDS ADDR:PORT [ADDR:PORT ...]
 *
 * Loops for SECONDS: socket(), connect() to the next target (targets are taken in
 * turn), write a 4-byte request, read the reply (the backend address the server
 * saw), close. The close uses SO_LINGER {1, 0} after the reply has been read, so
 * neither side keeps a TIME_WAIT socket and the run does not depend on the
 * ephemeral port range. Prints one line:
 *
 *   ok=N err=M seconds=S conn_per_s=R backends=B first_error=...
 *
 * where B is the number of distinct backend addresses that answered.
 * Built at run time by benchmarks/service_lb/run. Exit 0 if ok > 0.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_TARGETS 64
#define MAX_SEEN 256

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	struct sockaddr_in tg[MAX_TARGETS];
	char seen[MAX_SEEN][64];
	char first_error[128] = "none";
	int ntg = 0, nseen = 0, i;
	long ok = 0, err = 0;
	double seconds, t0, t, end;
	struct linger lg = { 1, 0 };

	if (argc < 3) {
		fprintf(stderr, "usage: %s SECONDS ADDR:PORT [ADDR:PORT ...]\n", argv[0]);
		return 2;
	}
	seconds = atof(argv[1]);
	for (i = 2; i < argc && ntg < MAX_TARGETS; i++) {
		char host[64];
		char *colon;

		snprintf(host, sizeof(host), "%s", argv[i]);
		colon = strrchr(host, ':');
		if (!colon) {
			fprintf(stderr, "bad target %s\n", argv[i]);
			return 2;
		}
		*colon = 0;
		memset(&tg[ntg], 0, sizeof(tg[ntg]));
		tg[ntg].sin_family = AF_INET;
		tg[ntg].sin_port = htons((unsigned short)atoi(colon + 1));
		if (inet_pton(AF_INET, host, &tg[ntg].sin_addr) != 1) {
			fprintf(stderr, "bad address %s\n", host);
			return 2;
		}
		ntg++;
	}
	t0 = now();
	end = t0 + seconds;
	for (i = 0;; i = (i + 1) % ntg) {
		char buf[64];
		ssize_t n, got = 0;
		int fd;

		t = now();
		if (t >= end)
			break;
		fd = socket(AF_INET, SOCK_STREAM, 0);
		if (fd < 0) {
			snprintf(first_error, sizeof(first_error), "socket:%s", strerror(errno));
			err++;
			continue;
		}
		if (connect(fd, (struct sockaddr *)&tg[i], sizeof(tg[i])) < 0) {
			if (!err)
				snprintf(first_error, sizeof(first_error), "connect:%s", strerror(errno));
			err++;
			close(fd);
			continue;
		}
		if (write(fd, "GET\n", 4) != 4) {
			if (!err)
				snprintf(first_error, sizeof(first_error), "write:%s", strerror(errno));
			err++;
			close(fd);
			continue;
		}
		while ((size_t)got < sizeof(buf) - 1) {
			n = read(fd, buf + got, sizeof(buf) - 1 - (size_t)got);
			if (n <= 0)
				break;
			got += n;
			if (buf[got - 1] == '\n')
				break;
		}
		if (got > 0 && buf[got - 1] == '\n') {
			ok++;
			buf[got - 1] = 0;
			if (nseen < MAX_SEEN) {
				int k;

				for (k = 0; k < nseen && strcmp(seen[k], buf); k++)
					;
				if (k == nseen)
					snprintf(seen[nseen++], sizeof(seen[0]), "%s", buf);
			}
		} else {
			if (!err)
				snprintf(first_error, sizeof(first_error), "read:%s", got < 0 ? strerror(errno) : "short reply");
			err++;
		}
		setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
		close(fd);
	}
	t = now() - t0;
	printf("ok=%ld err=%ld seconds=%.3f conn_per_s=%.1f backends=%d first_error=%s\n",
	       ok, err, t, (double)ok / t, nseen, first_error);
	return ok > 0 ? 0 : 1;
}
