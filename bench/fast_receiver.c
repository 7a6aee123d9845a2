/*
 * fast_receiver.c: the HTTP receiver of the webhooks bench (bench/webhooks.sh).
 *
 * Answers every request "200 OK" with an empty body on a keep-alive
 * connection, verifying nothing and logging nothing: one epoll loop that
 * costs a few microseconds a request, so that the relay, not the receiver,
 * bounds the throughput and the signed/unsigned ratio measures the relay's
 * cost of signing.  (The tests' receiver, test/receiver.pl, logs every
 * request for the checks; it is not used here.)
 *
 * It counts requests, and those that carry a webhook-signature header, per
 * path (/signed, anything else), and writes them at SIGTERM to the stats
 * file: "signed_path_requests S signatures G other_requests O other_signatures X".
 *
 * Usage: fast_receiver PORT_FILE STATS_FILE
 */
#define _GNU_SOURCE				/* memmem */
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF_SIZE 65536
#define MAX_FD 4096

typedef struct Conn
{
	size_t		len;
	char		buf[BUF_SIZE];
} Conn;

static Conn *conns[MAX_FD];
static volatile sig_atomic_t stop = 0;
static unsigned long counts[4];	/* /signed: requests, signatures; other: same */

static void
on_term(int sig)
{
	(void) sig;
	stop = 1;
}

/* Value of header name in [h, end) (lines after the request line), or NULL. */
static const char *
header(const char *h, const char *end, const char *name)
{
	size_t		n = strlen(name);
	const char *p = memchr(h, '\n', end - h);

	while (p && p + 1 < end)
	{
		p++;
		if ((size_t) (end - p) > n && strncasecmp(p, name, n) == 0 && p[n] == ':')
			return p + n + 1;
		p = memchr(p, '\n', end - p);
	}
	return NULL;
}

/* Answer every complete request in c; -1 if the connection must close. */
static int
serve(int fd, Conn *c)
{
	static const char ok[] = "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";

	for (;;)
	{
		char	   *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
		const char *cl;
		size_t		total;
		int			other;

		if (end == NULL)
			return c->len == BUF_SIZE ? -1 : 0;
		cl = header(c->buf, end, "content-length");
		total = (end + 4 - c->buf) + (cl ? strtoul(cl, NULL, 10) : 0);
		if (total > BUF_SIZE)
			return -1;
		if (total > c->len)
		{
			if (header(c->buf, end, "expect"))
				(void) write(fd, "HTTP/1.1 100 Continue\r\n\r\n", 25);
			return 0;
		}
		other = strncmp(c->buf, "POST /signed ", 13) != 0;
		counts[other * 2]++;
		if (header(c->buf, end, "webhook-signature"))
			counts[other * 2 + 1]++;
		if (write(fd, ok, sizeof(ok) - 1) != sizeof(ok) - 1)
			return -1;
		memmove(c->buf, c->buf + total, c->len - total);
		c->len -= total;
	}
}

int
main(int argc, char **argv)
{
	struct sockaddr_in addr = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t	alen = sizeof(addr);
	struct epoll_event ev = {.events = EPOLLIN}, evs[256];
	int			lfd, ep, one = 1;
	FILE	   *f;

	if (argc != 3)
	{
		fprintf(stderr, "usage: %s PORT_FILE STATS_FILE\n", argv[0]);
		return 2;
	}
	signal(SIGTERM, on_term);
	signal(SIGINT, on_term);
	signal(SIGPIPE, SIG_IGN);
	lfd = socket(AF_INET, SOCK_STREAM, 0);
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(lfd, (struct sockaddr *) &addr, sizeof(addr)) < 0 || listen(lfd, 512) < 0 ||
		getsockname(lfd, (struct sockaddr *) &addr, &alen) < 0)
	{
		perror("fast_receiver: listen");
		return 1;
	}
	ep = epoll_create1(0);
	ev.data.fd = lfd;
	epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
	f = fopen(argv[1], "w");
	if (f == NULL)
	{
		perror("fast_receiver: port file");
		return 1;
	}
	fprintf(f, "%d\n", ntohs(addr.sin_port));
	fclose(f);

	while (!stop)
	{
		int			n = epoll_wait(ep, evs, 256, 1000);
		int			i;

		for (i = 0; i < n; i++)
		{
			int			fd = evs[i].data.fd;
			Conn	   *c;
			ssize_t		r;

			if (fd == lfd)
			{
				int			cfd = accept(lfd, NULL, NULL);

				if (cfd < 0 || cfd >= MAX_FD)
				{
					if (cfd >= 0)
						close(cfd);
					continue;
				}
				if (conns[cfd] == NULL)
					conns[cfd] = malloc(sizeof(Conn));
				conns[cfd]->len = 0;
				ev.data.fd = cfd;
				epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &ev);
				continue;
			}
			c = conns[fd];
			r = read(fd, c->buf + c->len, BUF_SIZE - c->len);
			if (r > 0)
			{
				c->len += r;
				if (serve(fd, c) == 0)
					continue;
			}
			else if (r < 0 && errno == EINTR)
				continue;
			epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
			close(fd);
		}
	}
	f = fopen(argv[2], "w");
	if (f == NULL)
		return 1;
	fprintf(f, "signed_path_requests %lu signatures %lu other_requests %lu other_signatures %lu\n",
			counts[0], counts[1], counts[2], counts[3]);
	fclose(f);
	return 0;
}
