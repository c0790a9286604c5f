/* lbserver: the backend of benchmarks/service_lb.
 *
 *   lbserver PORT
 *
 * One thread, epoll. Listens on 0.0.0.0:PORT; for every connection: read the
 * request (a few bytes), write the local address the client reached ("10.200.0.7\n"),
 * close. Runs until killed. Built at run time by benchmarks/service_lb/run.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static void die(const char *what)
{
	perror(what);
	exit(1);
}

/* answer one connection whose request is readable; 0 = done (closed), 1 = not yet readable */
static int serve(int fd)
{
	char buf[256];
	struct sockaddr_in me;
	socklen_t len = sizeof(me);
	ssize_t n = read(fd, buf, sizeof(buf));

	if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
		return 1;
	if (n > 0 && getsockname(fd, (struct sockaddr *)&me, &len) == 0) {
		int m = snprintf(buf, sizeof(buf), "%s\n", inet_ntoa(me.sin_addr));

		if (write(fd, buf, (size_t)m) < 0) {
			/* the client went away; nothing to do */
		}
	}
	close(fd);
	return 0;
}

int main(int argc, char **argv)
{
	int one = 1, lfd, ep;
	struct sockaddr_in a;
	struct epoll_event ev, evs[256];

	if (argc != 2) {
		fprintf(stderr, "usage: %s PORT\n", argv[0]);
		return 2;
	}
	signal(SIGPIPE, SIG_IGN);
	lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
	if (lfd < 0)
		die("socket");
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	memset(&a, 0, sizeof(a));
	a.sin_family = AF_INET;
	a.sin_port = htons((unsigned short)atoi(argv[1]));
	a.sin_addr.s_addr = htonl(INADDR_ANY);
	if (bind(lfd, (struct sockaddr *)&a, sizeof(a)) < 0)
		die("bind");
	if (listen(lfd, 4096) < 0)
		die("listen");
	ep = epoll_create1(0);
	if (ep < 0)
		die("epoll_create1");
	ev.events = EPOLLIN;
	ev.data.fd = lfd;
	if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev) < 0)
		die("epoll_ctl");
	printf("listening on 0.0.0.0:%s\n", argv[1]);
	fflush(stdout);
	for (;;) {
		int i, n = epoll_wait(ep, evs, 256, -1);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			die("epoll_wait");
		}
		for (i = 0; i < n; i++) {
			int fd = evs[i].data.fd;

			if (fd != lfd) {
				epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
				serve(fd);
				continue;
			}
			for (;;) {
				int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK);

				if (c < 0)
					break;
				if (serve(c) == 1) {
					ev.events = EPOLLIN;
					ev.data.fd = c;
					if (epoll_ctl(ep, EPOLL_CTL_ADD, c, &ev) < 0)
						close(c);
				}
			}
		}
	}
}
