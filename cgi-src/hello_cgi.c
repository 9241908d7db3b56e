/* hello_cgi: the trivial CGI program (RFC 3875) the bench runs behind
 * fcgiwrap and behind a cgipool `protocol = "cgi"` pool: one header block,
 * one line of body, exit. */
#include <unistd.h>

static const char response[] = "Content-Type: text/plain\r\n\r\nhello\n";

int main(void)
{
    size_t off = 0;
    while (off < sizeof response - 1) {
        ssize_t n = write(STDOUT_FILENO, response + off, sizeof response - 1 - off);
        if (n < 0)
            return 1;
        off += (size_t)n;
    }
    return 0;
}
