/*
 * agent.c - devdax-lab guest agent.
 *
 * Runs inside the guest's busybox initramfs, started by /init with the path of
 * a virtio-serial port.  The host drives an experiment one step at a time by
 * writing ONE JSON OBJECT PER LINE; the agent answers every request with one
 * line carrying the same id.  The serial console stays free for humans, and
 * the host never has to scrape text.
 *
 * Every named "process" of a scenario is a real worker process (forked from
 * the agent, or from another worker by the fork command), so page tables, COW
 * and pins are exactly what the kernel gives an ordinary program.  The agent
 * itself only parses, routes and relays; it never touches experiment memory,
 * so a SIGBUS in a worker cannot take the control channel down, and a worker
 * stuck in a fault does not stop the agent from answering others.
 *
 * Build: gcc -static -O2 -Wall -Wextra -o agent agent.c
 * Usage: agent PORT_PATH|- [--device-dir DIR] [--sysfs-dax DIR] [--files-dir DIR] [--allow-poweroff]
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/io_uring.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <time.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/sched.h> /* CLONE_PARENT */
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

/* Longest request or reply line.  A pagemap reply for MAX_ARRAY pages fits. */
#define MAX_MSG (4u << 20)
#define MAX_ARRAY 32768
#define MAX_FIELDS 32
#define MAX_PROCS 64
#define MAX_PENDING 128 /* requests in flight per worker */
#define MAX_HANDLES 64  /* pins or pipes per worker */
#define MAX_DEVICES 256
#define NAME_LEN 32     /* process names and JSON keys, including the NUL */

static const char *g_device_dir = "/dev";
static const char *g_sysfs_dax = "/sys/bus/dax/devices";
static const char *g_files_dir = "/tmp/devdax-lab"; /* "put" and "run": /tmp is a tmpfs */
static bool g_allow_poweroff;
static pid_t g_agent_pid;
static long g_page_size = 4096;

/* ------------------------------------------------------------------------ */
/* Growable string buffer: every reply is built in one and written at once. */

struct sbuf {
	char *p;
	size_t len, cap;
	bool oom;
};

static void sb_putn(struct sbuf *b, const void *s, size_t n)
{
	if (b->oom || n == 0)
		return;
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 256;
		while (cap < b->len + n + 1)
			cap *= 2;
		char *p = realloc(b->p, cap);
		if (!p) {
			b->oom = true;
			return;
		}
		b->p = p;
		b->cap = cap;
	}
	memcpy(b->p + b->len, s, n);
	b->len += n;
	b->p[b->len] = '\0';
}

static void sb_puts(struct sbuf *b, const char *s) { sb_putn(b, s, strlen(s)); }
static void sb_putc(struct sbuf *b, char c) { sb_putn(b, &c, 1); }

__attribute__((format(printf, 2, 3)))
static void sb_printf(struct sbuf *b, const char *fmt, ...)
{
	char tmp[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
	va_end(ap);
	if (n >= 0 && (size_t)n < sizeof tmp)
		sb_putn(b, tmp, (size_t)n);
	else if (n >= 0)
		sb_putn(b, tmp, sizeof tmp - 1); /* only long messages; truncation is fine */
}

static void sb_free(struct sbuf *b)
{
	free(b->p);
	memset(b, 0, sizeof *b);
}

/* Strings go out as JSON: quotes, backslashes and control bytes escaped.
 * Bytes >= 0x80 pass through, so UTF-8 from the host round-trips. */
static void sb_json_str(struct sbuf *b, const char *s, size_t n)
{
	sb_putc(b, '"');
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		switch (c) {
		case '"': sb_puts(b, "\\\""); break;
		case '\\': sb_puts(b, "\\\\"); break;
		case '\n': sb_puts(b, "\\n"); break;
		case '\r': sb_puts(b, "\\r"); break;
		case '\t': sb_puts(b, "\\t"); break;
		case '\b': sb_puts(b, "\\b"); break;
		case '\f': sb_puts(b, "\\f"); break;
		default:
			if (c < 0x20 || c == 0x7f)
				sb_printf(b, "\\u%04x", c);
			else
				sb_putc(b, (char)c);
		}
	}
	sb_putc(b, '"');
}

/* Result fields are appended as ,"key":value so handlers need no comma logic. */
static void res_key(struct sbuf *b, const char *key)
{
	sb_putc(b, ',');
	sb_json_str(b, key, strlen(key));
	sb_putc(b, ':');
}

static void res_u64(struct sbuf *b, const char *key, uint64_t v)
{
	res_key(b, key);
	sb_printf(b, "%" PRIu64, v);
}

static void res_i64(struct sbuf *b, const char *key, int64_t v)
{
	res_key(b, key);
	sb_printf(b, "%" PRId64, v);
}

static void res_str(struct sbuf *b, const char *key, const char *s)
{
	res_key(b, key);
	sb_json_str(b, s, strlen(s));
}

/* ------------------------------------------------------------------------ */
/* Errors: an errno for programs and a message for people.                  */

struct err {
	int no;
	char msg[768];
};

__attribute__((format(printf, 3, 4)))
static int fail(struct err *e, int no, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(e->msg, sizeof e->msg, fmt, ap);
	va_end(ap);
	e->no = no ? no : EIO;
	return -1;
}

/* ------------------------------------------------------------------------ */
/* A JSON parser for exactly what the protocol needs: one flat object whose  */
/* values are strings, integers, booleans, null or arrays of integers.      */

enum jtype { J_STR, J_INT, J_BOOL, J_NULL, J_ARR, J_STRS };

struct jval {
	char key[NAME_LEN];
	enum jtype type;
	char *str;      /* J_STR: NUL-terminated, may hold \u0000 inside */
	size_t len;     /* J_STR: bytes; J_ARR: elements */
	uint64_t u;     /* J_INT: magnitude */
	bool neg;       /* J_INT: negative */
	bool b;         /* J_BOOL */
	uint64_t *arr;  /* J_ARR */
	char **strs;    /* J_STRS: len strings, each NUL-terminated, then NULL */
};

struct jobj {
	struct jval f[MAX_FIELDS];
	int n;
};

struct jp {
	const char *p, *end;
	struct err *e;
};

static const char *jtype_name(enum jtype t)
{
	static const char *names[] = {"string", "integer", "boolean", "null", "array",
				      "array of strings"};
	return names[t];
}

static void jobj_free(struct jobj *o)
{
	for (int i = 0; i < o->n; i++) {
		free(o->f[i].str);
		free(o->f[i].arr);
		for (size_t k = 0; o->f[i].type == J_STRS && o->f[i].strs && k < o->f[i].len; k++)
			free(o->f[i].strs[k]);
		free(o->f[i].strs);
	}
	o->n = 0;
}

static struct jval *jobj_get(struct jobj *o, const char *key)
{
	for (int i = 0; i < o->n; i++)
		if (strcmp(o->f[i].key, key) == 0)
			return &o->f[i];
	return NULL;
}

static void jp_ws(struct jp *j)
{
	while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
		j->p++;
}

static int jp_bad(struct jp *j, const char *what)
{
	return fail(j->e, EINVAL, "bad JSON: %s", what);
}

static int jp_hex4(struct jp *j, unsigned *out)
{
	if (j->end - j->p < 4)
		return jp_bad(j, "short \\u escape");
	unsigned v = 0;
	for (int i = 0; i < 4; i++) {
		char c = *j->p++;
		v <<= 4;
		if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
		else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
		else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
		else return jp_bad(j, "bad \\u escape");
	}
	*out = v;
	return 0;
}

static void put_utf8(struct sbuf *b, unsigned cp)
{
	char u[4];
	if (cp < 0x80) {
		sb_putc(b, (char)cp);
	} else if (cp < 0x800) {
		u[0] = (char)(0xc0 | cp >> 6); u[1] = (char)(0x80 | (cp & 0x3f));
		sb_putn(b, u, 2);
	} else if (cp < 0x10000) {
		u[0] = (char)(0xe0 | cp >> 12); u[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
		u[2] = (char)(0x80 | (cp & 0x3f));
		sb_putn(b, u, 3);
	} else {
		u[0] = (char)(0xf0 | cp >> 18); u[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
		u[2] = (char)(0x80 | ((cp >> 6) & 0x3f)); u[3] = (char)(0x80 | (cp & 0x3f));
		sb_putn(b, u, 4);
	}
}

/* Parses a string starting at the opening quote into a fresh buffer. */
static int jp_string(struct jp *j, struct sbuf *b)
{
	j->p++; /* opening quote */
	for (;;) {
		if (j->p >= j->end)
			return jp_bad(j, "unterminated string");
		unsigned char c = (unsigned char)*j->p++;
		if (c == '"')
			break;
		if (c < 0x20)
			return jp_bad(j, "control character in string");
		if (c != '\\') {
			sb_putc(b, (char)c);
			continue;
		}
		if (j->p >= j->end)
			return jp_bad(j, "unterminated string");
		c = (unsigned char)*j->p++;
		switch (c) {
		case '"': case '\\': case '/': sb_putc(b, (char)c); break;
		case 'b': sb_putc(b, '\b'); break;
		case 'f': sb_putc(b, '\f'); break;
		case 'n': sb_putc(b, '\n'); break;
		case 'r': sb_putc(b, '\r'); break;
		case 't': sb_putc(b, '\t'); break;
		case 'u': {
			unsigned cp, lo;
			if (jp_hex4(j, &cp))
				return -1;
			if (cp >= 0xdc00 && cp <= 0xdfff)
				return jp_bad(j, "lone low surrogate");
			if (cp >= 0xd800 && cp <= 0xdbff) {
				if (j->end - j->p < 2 || j->p[0] != '\\' || j->p[1] != 'u')
					return jp_bad(j, "lone high surrogate");
				j->p += 2;
				if (jp_hex4(j, &lo))
					return -1;
				if (lo < 0xdc00 || lo > 0xdfff)
					return jp_bad(j, "bad surrogate pair");
				cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
			}
			put_utf8(b, cp);
			break;
		}
		default:
			return jp_bad(j, "bad escape in string");
		}
	}
	if (!b->p) { /* empty string: still give it a real, terminated buffer */
		sb_putc(b, 'x');
		b->len = 0;
		if (b->p)
			b->p[0] = '\0';
	}
	return b->oom ? fail(j->e, ENOMEM, "out of memory parsing a string") : 0;
}

/* Integers only: 2^64-1 and -2^63 are both valid; fractions are rejected
 * rather than rounded, because an address that silently changed is worse
 * than an error. */
static int jp_int(struct jp *j, uint64_t *u, bool *neg)
{
	*neg = false;
	if (j->p < j->end && *j->p == '-') {
		*neg = true;
		j->p++;
	}
	if (j->p >= j->end || *j->p < '0' || *j->p > '9')
		return jp_bad(j, "expected a value");
	if (*j->p == '0' && j->p + 1 < j->end && j->p[1] >= '0' && j->p[1] <= '9')
		return jp_bad(j, "leading zero");
	uint64_t v = 0;
	while (j->p < j->end && *j->p >= '0' && *j->p <= '9') {
		unsigned d = (unsigned)(*j->p++ - '0');
		if (v > (UINT64_MAX - d) / 10)
			return fail(j->e, EINVAL, "bad JSON: integer out of range");
		v = v * 10 + d;
	}
	if (j->p < j->end && (*j->p == '.' || *j->p == 'e' || *j->p == 'E'))
		return fail(j->e, EINVAL, "bad JSON: only integers are supported");
	if (*neg && v > (uint64_t)INT64_MAX + 1)
		return fail(j->e, EINVAL, "bad JSON: integer out of range");
	if (v == 0)
		*neg = false;
	*u = v;
	return 0;
}

/* An array whose first element is a string holds only strings (program
 * arguments for "run"); none may hold a NUL byte, since they become argv. */
/* After an array element: 1 if another follows (the ',' is eaten), 0 at
 * the end of the array (the ']' is eaten), -1 for anything else. */
static int jp_array_next(struct jp *j)
{
	jp_ws(j);
	if (j->p < j->end && *j->p == ',') {
		j->p++;
		return 1;
	}
	if (j->p < j->end && *j->p == ']') {
		j->p++;
		return 0;
	}
	return jp_bad(j, "expected , or ] in array");
}

static int jp_string_array(struct jp *j, struct jval *v)
{
	size_t cap = 0;
	v->type = J_STRS;
	for (;;) {
		jp_ws(j);
		if (j->p >= j->end || *j->p != '"')
			return fail(j->e, EINVAL, "bad JSON: an array of strings may only hold strings");
		if (v->len + 1 >= MAX_ARRAY)
			return fail(j->e, E2BIG, "array longer than %d elements", MAX_ARRAY);
		if (v->len + 2 > cap) {
			cap = cap ? cap * 2 : 8;
			char **a = realloc(v->strs, cap * sizeof *a);
			if (!a)
				return fail(j->e, ENOMEM, "out of memory parsing array");
			v->strs = a;
		}
		struct sbuf b = {0};
		int rc = jp_string(j, &b);
		if (rc == 0 && strlen(b.p) != b.len)
			rc = jp_bad(j, "string in array holds a NUL byte");
		if (rc) {
			sb_free(&b);
			return -1;
		}
		v->strs[v->len++] = b.p;
		v->strs[v->len] = NULL;
		int more = jp_array_next(j);
		if (more <= 0)
			return more;
	}
}

static int jp_array(struct jp *j, struct jval *v)
{
	size_t cap = 0;
	j->p++; /* [ */
	jp_ws(j);
	if (j->p < j->end && *j->p == ']') {
		j->p++;
		return 0;
	}
	if (j->p < j->end && *j->p == '"')
		return jp_string_array(j, v);
	for (;;) {
		bool neg;
		uint64_t u;
		jp_ws(j);
		if (j->p < j->end && (*j->p == '"' || *j->p == '[' || *j->p == '{' || *j->p == 't' ||
				      *j->p == 'f' || *j->p == 'n'))
			return fail(j->e, EINVAL, "bad JSON: arrays may only hold integers");
		if (jp_int(j, &u, &neg))
			return -1;
		if (neg)
			return fail(j->e, EINVAL, "bad JSON: negative integer in array");
		if (v->len == MAX_ARRAY)
			return fail(j->e, E2BIG, "array longer than %d elements", MAX_ARRAY);
		if (v->len == cap) {
			cap = cap ? cap * 2 : 16;
			uint64_t *a = realloc(v->arr, cap * sizeof *a);
			if (!a)
				return fail(j->e, ENOMEM, "out of memory parsing array");
			v->arr = a;
		}
		v->arr[v->len++] = u;
		int more = jp_array_next(j);
		if (more <= 0)
			return more;
	}
}

static bool jp_word(struct jp *j, const char *w)
{
	size_t n = strlen(w);
	if ((size_t)(j->end - j->p) < n || memcmp(j->p, w, n) != 0)
		return false;
	j->p += n;
	return true;
}

static int jp_value(struct jp *j, struct jval *v)
{
	if (j->p >= j->end)
		return jp_bad(j, "expected a value");
	char c = *j->p;
	if (c == '"') {
		struct sbuf b = {0};
		v->type = J_STR;
		int rc = jp_string(j, &b);
		v->str = b.p;
		v->len = b.len;
		return rc;
	}
	if (c == '-' || (c >= '0' && c <= '9')) {
		v->type = J_INT;
		return jp_int(j, &v->u, &v->neg);
	}
	if (c == '[') {
		v->type = J_ARR;
		return jp_array(j, v);
	}
	if (c == '{')
		return jp_bad(j, "nested objects are not supported");
	v->type = J_BOOL;
	if (jp_word(j, "true"))
		return v->b = true, 0;
	if (jp_word(j, "false"))
		return v->b = false, 0;
	v->type = J_NULL;
	if (jp_word(j, "null"))
		return 0;
	return jp_bad(j, "expected a value");
}

/* Fields are stored as they are parsed, so a caller can still find the id
 * of a request whose tail is malformed. */
static int json_parse_object(const char *s, size_t n, struct jobj *o, struct err *e)
{
	struct jp j = {s, s + n, e};
	o->n = 0;
	jp_ws(&j);
	if (j.p >= j.end || *j.p != '{')
		return jp_bad(&j, "expected an object");
	j.p++;
	jp_ws(&j);
	if (j.p < j.end && *j.p == '}') {
		j.p++;
		goto done;
	}
	for (;;) {
		jp_ws(&j);
		if (j.p >= j.end || *j.p != '"')
			return jp_bad(&j, "expected a key");
		struct sbuf key = {0};
		int rc = jp_string(&j, &key);
		if (rc == 0 && (key.len >= NAME_LEN || strlen(key.p) != key.len))
			rc = jp_bad(&j, "key too long or holds NUL");
		if (rc == 0 && jobj_get(o, key.p))
			rc = fail(e, EINVAL, "bad JSON: duplicate key \"%s\"", key.p);
		if (rc == 0 && o->n == MAX_FIELDS)
			rc = jp_bad(&j, "too many fields");
		if (rc) {
			sb_free(&key);
			return -1;
		}
		struct jval *v = &o->f[o->n];
		memset(v, 0, sizeof *v);
		memcpy(v->key, key.p, key.len + 1);
		sb_free(&key);
		jp_ws(&j);
		if (j.p >= j.end || *j.p != ':')
			return jp_bad(&j, "expected :");
		j.p++;
		jp_ws(&j);
		rc = jp_value(&j, v);
		o->n++; /* even on failure, so jobj_free() releases it */
		if (rc)
			return -1;
		jp_ws(&j);
		if (j.p < j.end && *j.p == ',') {
			j.p++;
			continue;
		}
		if (j.p < j.end && *j.p == '}') {
			j.p++;
			break;
		}
		return jp_bad(&j, "expected , or }");
	}
done:
	jp_ws(&j);
	if (j.p != j.end)
		return jp_bad(&j, "trailing data after object");
	return 0;
}

/* ------------------------------------------------------------------------ */
/* Requests and typed argument access.                                      */

struct req {
	struct jobj obj;
	int64_t id;
	bool has_id;
	const char *cmd;
};

static int parse_request(const char *line, size_t len, struct req *r, struct err *e)
{
	int rc = json_parse_object(line, len, &r->obj, e);
	struct jval *v = jobj_get(&r->obj, "id");
	if (v && v->type == J_INT && (v->neg || v->u <= INT64_MAX)) {
		r->has_id = true;
		r->id = v->neg ? (int64_t)(0 - v->u) : (int64_t)v->u;
	}
	if (rc)
		return rc;
	if (!r->has_id)
		return fail(e, EINVAL, "request needs an integer \"id\"");
	v = jobj_get(&r->obj, "cmd");
	if (!v || v->type != J_STR)
		return fail(e, EINVAL, "request needs a string \"cmd\"");
	r->cmd = v->str;
	return 0;
}

/* Returns the value, NULL if absent or null (meaning "use the default"). */
static struct jval *arg(struct req *r, const char *key)
{
	struct jval *v = jobj_get(&r->obj, key);
	return v && v->type != J_NULL ? v : NULL;
}

static int arg_type(struct req *r, const char *key, struct jval *v, enum jtype want, struct err *e)
{
	if (!v)
		return fail(e, EINVAL, "%s: missing argument '%s' (%s)", r->cmd, key, jtype_name(want));
	if (v->type != want)
		return fail(e, EINVAL, "%s: argument '%s' must be %s %s, not %s", r->cmd, key,
			    want == J_INT || want == J_ARR ? "an" : "a", jtype_name(want), jtype_name(v->type));
	return 0;
}

static int get_str(struct req *r, const char *key, const char **out, struct err *e)
{
	struct jval *v = arg(r, key);
	if (arg_type(r, key, v, J_STR, e))
		return -1;
	if (strlen(v->str) != v->len)
		return fail(e, EINVAL, "%s: argument '%s' holds a NUL byte", r->cmd, key);
	*out = v->str;
	return 0;
}

static int get_u64(struct req *r, const char *key, bool required, uint64_t def, uint64_t *out,
		   struct err *e)
{
	struct jval *v = arg(r, key);
	*out = def;
	if (!v && !required)
		return 0;
	if (arg_type(r, key, v, J_INT, e))
		return -1;
	if (v->neg)
		return fail(e, EINVAL, "%s: argument '%s' must not be negative", r->cmd, key);
	*out = v->u;
	return 0;
}

static int get_i64(struct req *r, const char *key, bool required, int64_t def, int64_t *out,
		   struct err *e)
{
	struct jval *v = arg(r, key);
	*out = def;
	if (!v && !required)
		return 0;
	if (arg_type(r, key, v, J_INT, e))
		return -1;
	if (!v->neg && v->u > INT64_MAX)
		return fail(e, EINVAL, "%s: argument '%s' is out of range", r->cmd, key);
	*out = v->neg ? (int64_t)(0 - v->u) : (int64_t)v->u;
	return 0;
}

static int get_bool(struct req *r, const char *key, bool required, bool def, bool *out,
		    struct err *e)
{
	struct jval *v = arg(r, key);
	*out = def;
	if (!v && !required)
		return 0;
	if (arg_type(r, key, v, J_BOOL, e))
		return -1;
	*out = v->b;
	return 0;
}

static int get_array(struct req *r, const char *key, const uint64_t **arr, size_t *n,
		     struct err *e)
{
	struct jval *v = arg(r, key);
	if (arg_type(r, key, v, J_ARR, e))
		return -1;
	*arr = v->arr;
	*n = v->len;
	return 0;
}

/* An optional array of strings; an empty JSON array counts as one. */
static int get_strs(struct req *r, const char *key, char *const **out, size_t *n, struct err *e)
{
	static char *const none[] = {NULL};
	struct jval *v = arg(r, key);
	*out = none;
	*n = 0;
	if (!v)
		return 0;
	if (v->type == J_ARR && v->len == 0)
		return 0;
	if (arg_type(r, key, v, J_STRS, e))
		return -1;
	*out = v->strs;
	*n = v->len;
	return 0;
}

/* Process and device names end up in paths and in comm: keep them plain. */
static bool valid_name(const char *s)
{
	size_t n = strlen(s);
	if (n == 0 || n >= NAME_LEN || strcmp(s, ".") == 0 || strcmp(s, "..") == 0)
		return false;
	for (; *s; s++)
		if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') ||
		      (*s >= '0' && *s <= '9') || *s == '_' || *s == '-' || *s == '.'))
			return false;
	return true;
}

/* Builds the whole reply line (without the newline). */
static void build_response(struct sbuf *out, int64_t id, int rc, struct sbuf *res, struct err *e,
			   const char *cmd, const struct sbuf *extra)
{
	if (rc == 0 && res->oom)
		rc = fail(e, ENOMEM, "%s: out of memory building the reply", cmd);
	if (rc == 0 && res->len + 64 > MAX_MSG)
		rc = fail(e, E2BIG, "%s: reply of %zu bytes is too long (ask for fewer items)", cmd,
			  res->len);
	sb_printf(out, "{\"id\":%" PRId64 ",\"ok\":", id);
	if (rc == 0) {
		sb_puts(out, "true");
		sb_putn(out, res->p, res->len);
	} else {
		sb_printf(out, "false,\"errno\":%d,\"error\":", e->no);
		sb_json_str(out, e->msg, strlen(e->msg));
	}
	if (extra && extra->len) /* the worker's signals, on success and failure alike */
		sb_putn(out, extra->p, extra->len);
	sb_putc(out, '}');
}

/* ------------------------------------------------------------------------ */
/* Worker side.  Globals here belong to one worker process each (fork gives  */
/* every worker its own copy).                                              */

struct handle {
	int id;
	int fd[2]; /* pin: ring fd in fd[0]; pipe: read end, write end */
};

static struct handle g_pins[MAX_HANDLES], g_pipes[MAX_HANDLES];
static int g_next_pin = 1, g_next_pipe = 1;
static int g_recv_fd = -1;      /* fd passed with the current request (fork) */
static bool g_exit_after_reply; /* set by the exit command */
static int g_exit_status;
static unsigned g_touch_seq;

static sigjmp_buf g_fault_jmp;
static volatile sig_atomic_t g_fault_armed;
static void *volatile g_fault_addr;
static volatile sig_atomic_t g_fault_sig;
static volatile sig_atomic_t g_fault_code;

/* Every signal a worker receives is recorded here by its handler and
 * reported with the worker's next reply ("signals"), so that a SIGBUS the
 * kernel sends (memory_failure's BUS_MCEERR_AR for MADV_HWPOISON) is data of
 * the step that caused it.  The handler only appends; the worker loop drains
 * with the signals blocked. */
#define MAX_SIGRECS 32
struct sigrec {
	int sig, code, lsb;
	uintptr_t addr;
	pid_t sender;
};
static struct sigrec g_sigrecs[MAX_SIGRECS];
static volatile sig_atomic_t g_nsigrecs, g_sigrecs_lost;
static volatile sig_atomic_t g_unarmed_repeats; /* the same fault again, outside a touch */
static void *volatile g_unarmed_addr;
static bool g_report_signals; /* the "signals" command: report even none */

/* Signals that come from the instruction the worker executes (a fault), and
 * the others a worker records and survives (their default would end it;
 * SIGKILL and SIGSTOP cannot be caught: the agent reports those deaths). */
static const int g_fault_signals[] = {SIGBUS, SIGSEGV, SIGILL, SIGFPE, SIGTRAP, SIGSYS};
static const int g_other_signals[] = {SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM,
				      SIGTERM, SIGXCPU, SIGXFSZ, SIGVTALRM, SIGPROF};
#define NELEM(a) (sizeof(a) / sizeof((a)[0]))

static int handle_add(struct handle *tab, int *next_id, int fd0, int fd1)
{
	for (int i = 0; i < MAX_HANDLES; i++) {
		if (tab[i].id == 0) {
			tab[i] = (struct handle){*next_id, {fd0, fd1}};
			return (*next_id)++;
		}
	}
	return -1;
}

static struct handle *handle_find(struct handle *tab, uint64_t id)
{
	for (int i = 0; i < MAX_HANDLES; i++)
		if (tab[i].id != 0 && (uint64_t)tab[i].id == id)
			return &tab[i];
	return NULL;
}

static void record_signal(int sig, const siginfo_t *si)
{
	if (g_nsigrecs >= MAX_SIGRECS) {
		g_sigrecs_lost++;
		return;
	}
	struct sigrec *s = &g_sigrecs[g_nsigrecs];
	s->sig = sig;
	s->code = si->si_code;
	/* si_addr means something only for a signal the kernel raised (si_code
	 * > 0); one from kill() carries the sender instead. */
	s->addr = si->si_code > 0 ? (uintptr_t)si->si_addr : 0;
	s->sender = si->si_code <= 0 ? si->si_pid : 0;
	s->lsb = sig == SIGBUS && (si->si_code == BUS_MCEERR_AR || si->si_code == BUS_MCEERR_AO)
		 ? si->si_addr_lsb : 0;
	g_nsigrecs++;
}

/* A fault while touching memory becomes an EFAULT reply (siglongjmp out of
 * the touch).  Outside a touch the handler records and returns: a SIGBUS the
 * kernel raised on the way out of a system call (memory_failure() sends
 * BUS_MCEERR_AR to the caller of madvise(MADV_HWPOISON)) leaves nothing to
 * retry, and the worker goes on.  A real fault outside a touch would come
 * back at once; the third time at the same address the handler gives up and
 * the next one ends the worker, which the agent then reports as killed.
 * Runs on its own stack so that even a fault caused by the stack works. */
static void on_fault(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	record_signal(sig, si);
	if (g_fault_armed) {
		g_fault_armed = 0;
		g_fault_addr = si->si_addr;
		g_fault_sig = sig;
		g_fault_code = si->si_code;
		siglongjmp(g_fault_jmp, 1);
	}
	if (si->si_code <= 0)
		return; /* sent by kill(): nothing to re-execute */
	if (si->si_addr == g_unarmed_addr) {
		if (++g_unarmed_repeats >= 3)
			signal(sig, SIG_DFL);
	} else {
		g_unarmed_addr = si->si_addr;
		g_unarmed_repeats = 1;
	}
}

static void on_other_signal(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	record_signal(sig, si);
}

static void block_recorded_signals(int how)
{
	sigset_t set;
	sigemptyset(&set);
	for (size_t i = 0; i < NELEM(g_fault_signals); i++)
		sigaddset(&set, g_fault_signals[i]);
	for (size_t i = 0; i < NELEM(g_other_signals); i++)
		sigaddset(&set, g_other_signals[i]);
	sigprocmask(how, &set, NULL);
}

/* ,"signals":[{"signal":7,"code":4,"addr":N,"addr_lsb":12,"sender":0},...]
 * (and "signals_lost" when the queue overflowed); nothing when no signal
 * came, unless asked by the "signals" command. */
static void drain_signals(struct sbuf *out)
{
	block_recorded_signals(SIG_BLOCK);
	int n = g_nsigrecs, lost = g_sigrecs_lost;
	if (n || lost || g_report_signals) {
		sb_puts(out, ",\"signals\":[");
		for (int i = 0; i < n; i++) {
			struct sigrec *s = &g_sigrecs[i];
			sb_printf(out, "%s{\"signal\":%d,\"code\":%d,\"addr\":%" PRIuPTR
				  ",\"addr_lsb\":%d,\"sender\":%d}", i ? "," : "", s->sig, s->code,
				  s->addr, s->lsb, (int)s->sender);
		}
		sb_putc(out, ']');
		if (lost)
			sb_printf(out, ",\"signals_lost\":%d", lost);
	}
	g_nsigrecs = 0;
	g_sigrecs_lost = 0;
	g_report_signals = false;
	block_recorded_signals(SIG_UNBLOCK);
}

static void install_fault_handlers(void)
{
	static char altstack[64 * 1024];
	stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack};
	sigaltstack(&ss, NULL);
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_fault;
	sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
	sigemptyset(&sa.sa_mask);
	for (size_t i = 0; i < NELEM(g_fault_signals); i++)
		sigaction(g_fault_signals[i], &sa, NULL);
	sa.sa_sigaction = on_other_signal;
	sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
	for (size_t i = 0; i < NELEM(g_other_signals); i++)
		sigaction(g_other_signals[i], &sa, NULL);
	g_nsigrecs = 0;
	g_sigrecs_lost = 0;
}

/* Misaligned: reserve length+align bytes of PROT_NONE address space, put the
 * mapping at the first aligned address inside it and give back the slack on
 * both sides.  That is how a 1 GiB device gets a PUD-aligned address. */
static void *map_aligned(int fd, uint64_t len, int prot, int flags, uint64_t off, uint64_t align,
			 const char **step)
{
	*step = "mmap";
	void *p = mmap(NULL, len, prot, flags, fd, (off_t)off);
	if (p == MAP_FAILED || align == 0 || (uintptr_t)p % align == 0)
		return p;
	munmap(p, len);
	uint64_t plen = (len + (uint64_t)g_page_size - 1) / (uint64_t)g_page_size * (uint64_t)g_page_size;
	*step = "reserve";
	if (plen > SIZE_MAX - align) {
		errno = ENOMEM;
		return MAP_FAILED;
	}
	char *resv = mmap(NULL, plen + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
			  -1, 0);
	if (resv == MAP_FAILED)
		return MAP_FAILED;
	uintptr_t lo = (uintptr_t)resv, hi = lo + plen + align;
	uintptr_t start = (lo + align - 1) / align * align;
	*step = "mmap fixed";
	p = mmap((void *)start, len, prot, flags | MAP_FIXED, fd, (off_t)off);
	if (p == MAP_FAILED) {
		int en = errno;
		munmap(resv, plen + align);
		errno = en;
		return MAP_FAILED;
	}
	if (start > lo)
		munmap(resv, start - lo);
	if (hi > start + plen)
		munmap((void *)(start + plen), hi - (start + plen));
	return p;
}

static int cmd_mmap(struct req *r, struct sbuf *res, struct err *e)
{
	const char *dev;
	uint64_t length, offset, align;
	bool write, shared;
	if (get_str(r, "device", &dev, e) || get_u64(r, "length", true, 0, &length, e) ||
	    get_u64(r, "offset", false, 0, &offset, e) || get_bool(r, "write", false, true, &write, e) ||
	    get_bool(r, "shared", false, true, &shared, e) || get_u64(r, "align", false, 0, &align, e))
		return -1;
	if (length == 0 || length > SIZE_MAX / 2)
		return fail(e, EINVAL, "mmap %s: bad length %" PRIu64, dev, length);
	if (offset > INT64_MAX)
		return fail(e, EINVAL, "mmap %s: offset out of range", dev);
	if (align % (uint64_t)g_page_size != 0 || align > (1ULL << 40))
		return fail(e, EINVAL, "mmap %s: align must be a multiple of the page size", dev);

	int prot = PROT_READ | (write ? PROT_WRITE : 0);
	int flags = shared ? MAP_SHARED : MAP_PRIVATE;
	int fd = -1;
	char path[PATH_MAX];
	if (strcmp(dev, "anon") == 0) {
		/* Anonymous memory, for comparing against device memory. */
		if (offset)
			return fail(e, EINVAL, "mmap anon: offset must be 0");
		flags |= MAP_ANONYMOUS;
	} else {
		if (!valid_name(dev))
			return fail(e, EINVAL, "mmap: bad device name '%s'", dev);
		snprintf(path, sizeof path, "%s/%s", g_device_dir, dev);
		/* O_RDWR even for read-only maps so a later mprotect can add write. */
		fd = open(path, O_RDWR | O_CLOEXEC);
		if (fd < 0 && (errno == EACCES || errno == EROFS) && !(write && shared))
			fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0) {
			int en = errno;
			return fail(e, en, "mmap %s: open %s: %s", dev, path, strerror(en));
		}
	}
	const char *step;
	void *addr = map_aligned(fd, length, prot, flags, offset, align, &step);
	int en = errno;
	if (fd >= 0)
		close(fd); /* the mapping keeps the device open */
	if (addr == MAP_FAILED)
		return fail(e, en, "mmap %s: %s: %s", dev, step, strerror(en));
	res_u64(res, "addr", (uintptr_t)addr);
	res_u64(res, "length", length);
	return 0;
}

/* A write is a pure store, not read-modify-write, so each page takes exactly
 * one (write) fault; a read is one volatile load. */
static int cmd_touch(struct req *r, struct sbuf *res, struct err *e)
{
	const uint64_t *addrs;
	size_t n;
	bool write;
	if (get_array(r, "addrs", &addrs, &n, e) || get_bool(r, "write", true, false, &write, e))
		return -1;
	uint8_t val = (uint8_t)(1 + g_touch_seq++ % 255);
	volatile size_t i = 0;
	if (sigsetjmp(g_fault_jmp, 1)) {
		return fail(e, EFAULT, "touch: %s (si_code %d) at address 0x%" PRIxPTR " (touching 0x%"
			    PRIx64 ", %zu of %zu done)", g_fault_sig == SIGBUS ? "SIGBUS"
			    : g_fault_sig == SIGSEGV ? "SIGSEGV" : strsignal(g_fault_sig),
			    (int)g_fault_code, (uintptr_t)g_fault_addr, addrs[i], (size_t)i, n);
	}
	g_fault_armed = 1;
	for (; i < n; i++) {
		volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)addrs[i];
		if (write)
			*p = val;
		else
			(void)*p;
	}
	g_fault_armed = 0;
	res_u64(res, "touched", n);
	return 0;
}

/* The child becomes a worker on the channel the agent passed with this
 * request; the parent answers with the child's pid. */
static void worker_start(int chan, const char *name) __attribute__((noreturn));

static int cmd_fork(struct req *r, struct sbuf *res, struct err *e)
{
	const char *child;
	if (get_str(r, "child", &child, e))
		return -1;
	if (g_recv_fd < 0)
		return fail(e, EINVAL, "fork %s: no channel came with the request", child);
	/* CLONE_PARENT: the child's parent is the agent, not this worker, so the
	 * agent learns how every worker ended (exit status or the signal that
	 * killed it) from wait().  The address space is copied exactly as by
	 * fork(); only the parent link differs.  A raw clone leaves glibc's
	 * cached thread id stale in the child: workers never call raise(). */
	pid_t pid = (pid_t)syscall(SYS_clone, CLONE_PARENT | SIGCHLD, 0, NULL, NULL, 0);
	if (pid < 0) {
		int en = errno;
		return fail(e, en, "fork %s: clone: %s", child, strerror(en));
	}
	if (pid == 0) {
		char name[NAME_LEN];
		snprintf(name, sizeof name, "%s", child);
		worker_start(g_recv_fd, name);
	}
	close(g_recv_fd);
	g_recv_fd = -1;
	res_i64(res, "pid", pid);
	return 0;
}

static int get_range(struct req *r, uint64_t *addr, uint64_t *length, struct err *e)
{
	return get_u64(r, "addr", true, 0, addr, e) || get_u64(r, "length", true, 0, length, e) ? -1 : 0;
}

static int cmd_munmap(struct req *r, struct sbuf *res, struct err *e)
{
	uint64_t addr, length;
	(void)res;
	if (get_range(r, &addr, &length, e))
		return -1;
	if (munmap((void *)(uintptr_t)addr, length) < 0) {
		int en = errno;
		return fail(e, en, "munmap 0x%" PRIx64 "+%" PRIu64 ": %s", addr, length, strerror(en));
	}
	return 0;
}

static int cmd_madvise(struct req *r, struct sbuf *res, struct err *e)
{
	uint64_t addr, length;
	int64_t advice;
	(void)res;
	if (get_range(r, &addr, &length, e) || get_i64(r, "advice", true, 0, &advice, e))
		return -1;
	if (advice < INT_MIN || advice > INT_MAX)
		return fail(e, EINVAL, "madvise: advice %" PRId64 " out of range", advice);
	if (madvise((void *)(uintptr_t)addr, length, (int)advice) < 0) {
		int en = errno;
		return fail(e, en, "madvise 0x%" PRIx64 "+%" PRIu64 " advice %" PRId64 ": %s", addr,
			    length, advice, strerror(en));
	}
	return 0;
}

static int cmd_mprotect(struct req *r, struct sbuf *res, struct err *e)
{
	uint64_t addr, length;
	const char *ps;
	(void)res;
	if (get_range(r, &addr, &length, e) || get_str(r, "prot", &ps, e))
		return -1;
	int prot = PROT_NONE;
	for (const char *c = ps; *c; c++) {
		if (*c == 'r') prot |= PROT_READ;
		else if (*c == 'w') prot |= PROT_WRITE;
		else if (*c == 'x') prot |= PROT_EXEC;
		else return fail(e, EINVAL, "mprotect: prot '%s' may only hold letters r, w, x", ps);
	}
	if (mprotect((void *)(uintptr_t)addr, length, prot) < 0) {
		int en = errno;
		return fail(e, en, "mprotect 0x%" PRIx64 "+%" PRIu64 " '%s': %s", addr, length, ps,
			    strerror(en));
	}
	return 0;
}

#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif

/* mremap: grow, shrink or move a mapping.  Which of these device-dax allows
 * is the kernel's business: every refusal comes back as its errno. */
static int cmd_mremap(struct req *r, struct sbuf *res, struct err *e)
{
	uint64_t addr, old_len, new_len, new_addr;
	bool maymove, fixed, dontunmap;
	if (get_u64(r, "addr", true, 0, &addr, e) || get_u64(r, "old_length", true, 0, &old_len, e) ||
	    get_u64(r, "new_length", true, 0, &new_len, e) ||
	    get_bool(r, "maymove", false, false, &maymove, e) ||
	    get_bool(r, "fixed", false, false, &fixed, e) ||
	    get_bool(r, "dontunmap", false, false, &dontunmap, e) ||
	    get_u64(r, "new_addr", false, 0, &new_addr, e))
		return -1;
	int flags = (maymove ? MREMAP_MAYMOVE : 0) | (fixed ? MREMAP_FIXED : 0) |
		    (dontunmap ? MREMAP_DONTUNMAP : 0);
	void *p = mremap((void *)(uintptr_t)addr, old_len, new_len, flags, (void *)(uintptr_t)new_addr);
	if (p == MAP_FAILED) {
		int en = errno;
		return fail(e, en, "mremap 0x%" PRIx64 "+%" PRIu64 " to %" PRIu64 " flags %d: %s", addr,
			    old_len, new_len, flags, strerror(en));
	}
	res_u64(res, "addr", (uintptr_t)p);
	res_u64(res, "length", new_len);
	return 0;
}

#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 1
#endif

/* mlock (or mlock2 with MLOCK_ONFAULT): the kernel may also fault the range
 * in, which is part of what the lab wants to see. */
static int cmd_mlock(struct req *r, struct sbuf *res, struct err *e)
{
	uint64_t addr, length;
	bool onfault;
	(void)res;
	if (get_range(r, &addr, &length, e) || get_bool(r, "onfault", false, false, &onfault, e))
		return -1;
	int rc = onfault ? mlock2((void *)(uintptr_t)addr, length, MLOCK_ONFAULT)
			 : mlock((void *)(uintptr_t)addr, length);
	if (rc < 0) {
		int en = errno;
		return fail(e, en, "%s 0x%" PRIx64 "+%" PRIu64 ": %s", onfault ? "mlock2 ONFAULT" : "mlock",
			    addr, length, strerror(en));
	}
	return 0;
}

static int cmd_munlock(struct req *r, struct sbuf *res, struct err *e)
{
	uint64_t addr, length;
	(void)res;
	if (get_range(r, &addr, &length, e))
		return -1;
	if (munlock((void *)(uintptr_t)addr, length) < 0) {
		int en = errno;
		return fail(e, en, "munlock 0x%" PRIx64 "+%" PRIu64 ": %s", addr, length, strerror(en));
	}
	return 0;
}

/* maps: the worker's own /proc/self/maps, one object per VMA.  With "smaps"
 * the VmFlags line of /proc/self/smaps comes too ("lo" = VM_LOCKED); smaps
 * walks the page tables, which on a PUD-mapped device-dax range zaps the PUD
 * as a pagemap read does, so it is asked for only when wanted. */
static int cmd_maps(struct req *r, struct sbuf *res, struct err *e)
{
	bool smaps;
	if (get_bool(r, "smaps", false, false, &smaps, e))
		return -1;
	const char *path = smaps ? "/proc/self/smaps" : "/proc/self/maps";
	FILE *f = fopen(path, "re");
	if (!f) {
		int en = errno;
		return fail(e, en, "maps: open %s: %s", path, strerror(en));
	}
	char line[PATH_MAX + 256];
	bool first = true, open_obj = false;
	res_key(res, "vmas");
	sb_putc(res, '[');
	while (fgets(line, sizeof line, f)) {
		unsigned long long start, end, off;
		char perms[8];
		int pathpos = 0;
		line[strcspn(line, "\n")] = '\0';
		if (sscanf(line, "%llx-%llx %7s %llx %*s %*s %n", &start, &end, perms, &off, &pathpos) >= 4 &&
		    pathpos > 0) {
			if (open_obj)
				sb_putc(res, '}');
			sb_printf(res, "%s{\"start\":%llu,\"end\":%llu,\"perms\":\"%s\",\"offset\":%llu",
				  first ? "" : ",", start, end, perms, off);
			res_str(res, "path", line + pathpos);
			first = false;
			open_obj = true;
		} else if (open_obj && strncmp(line, "VmFlags:", 8) == 0) {
			char *fl = line + 8;
			fl += strspn(fl, " ");
			fl[strcspn(fl, "\n")] = '\0';
			while (*fl && fl[strlen(fl) - 1] == ' ')
				fl[strlen(fl) - 1] = '\0';
			res_str(res, "vmflags", fl);
		} else if (open_obj && strncmp(line, "Locked:", 7) == 0) {
			unsigned long long kb = 0;
			if (sscanf(line + 7, "%llu", &kb) == 1)
				res_u64(res, "locked", kb * 1024);
		} else if (open_obj && strncmp(line, "Rss:", 4) == 0) {
			unsigned long long kb = 0;
			if (sscanf(line + 4, "%llu", &kb) == 1)
				res_u64(res, "rss", kb * 1024);
		}
	}
	if (open_obj)
		sb_putc(res, '}');
	sb_putc(res, ']');
	fclose(f);
	return 0;
}

/* The signals received since the last reply (the list is in every reply
 * that has some; this asks for it even when empty). */
static int cmd_signals(struct req *r, struct sbuf *res, struct err *e)
{
	(void)r;
	(void)res;
	(void)e;
	g_report_signals = true;
	return 0;
}

static int cmd_exit(struct req *r, struct sbuf *res, struct err *e)
{
	int64_t status;
	if (get_i64(r, "status", false, 0, &status, e))
		return -1;
	if (status < 0 || status > 255)
		return fail(e, EINVAL, "exit: status %" PRId64 " is not 0..255", status);
	g_exit_after_reply = true; /* reply first, then _exit() in the loop */
	g_exit_status = (int)status;
	res_i64(res, "pid", getpid());
	return 0;
}

/* Registering a buffer with io_uring pins its pages with FOLL_LONGTERM until
 * the buffer is unregistered: the long-term pin the lab wants to watch.  The
 * ring is never used for I/O, so it is not even mmapped. */
static int cmd_pin(struct req *r, struct sbuf *res, struct err *e)
{
	uint64_t addr, length;
	if (get_range(r, &addr, &length, e))
		return -1;
	struct io_uring_params params;
	memset(&params, 0, sizeof params);
	int fd = (int)syscall(__NR_io_uring_setup, 1, &params);
	if (fd < 0) {
		int en = errno;
		return fail(e, en, "pin: io_uring_setup: %s", strerror(en));
	}
	struct iovec iov = {(void *)(uintptr_t)addr, length};
	if (syscall(__NR_io_uring_register, fd, IORING_REGISTER_BUFFERS, &iov, 1) < 0) {
		int en = errno;
		close(fd);
		return fail(e, en, "pin 0x%" PRIx64 "+%" PRIu64 ": IORING_REGISTER_BUFFERS: %s", addr,
			    length, strerror(en));
	}
	int id = handle_add(g_pins, &g_next_pin, fd, -1);
	if (id < 0) {
		close(fd);
		return fail(e, EMFILE, "pin: more than %d pins in one process", MAX_HANDLES);
	}
	res_i64(res, "pin", id);
	return 0;
}

/* Unregister before closing: closing alone drops the pins later, from a
 * workqueue, and the host wants to see them go now. */
static int cmd_unpin(struct req *r, struct sbuf *res, struct err *e)
{
	uint64_t id;
	(void)res;
	if (get_u64(r, "pin", true, 0, &id, e))
		return -1;
	struct handle *h = handle_find(g_pins, id);
	if (!h)
		return fail(e, ENOENT, "unpin: no pin %" PRIu64, id);
	int rc = (int)syscall(__NR_io_uring_register, h->fd[0], IORING_UNREGISTER_BUFFERS, NULL, 0);
	int en = errno;
	close(h->fd[0]);
	h->id = 0;
	if (rc < 0)
		return fail(e, en, "unpin %" PRIu64 ": IORING_UNREGISTER_BUFFERS: %s (ring closed)", id,
			    strerror(en));
	return 0;
}

static uint64_t pipe_max_size(void)
{
	uint64_t v = 1 << 20;
	FILE *f = fopen("/proc/sys/fs/pipe-max-size", "re");
	if (f) {
		if (fscanf(f, "%" SCNu64, &v) != 1)
			v = 1 << 20;
		fclose(f);
	}
	return v;
}

/* vmsplice without SPLICE_F_GIFT leaves the pipe holding plain page
 * references to the user pages until it is drained: transient references.
 * The pipe is non-blocking so vmsplice stops when it is full instead of
 * waiting for a reader that will never come. */
static int cmd_splice(struct req *r, struct sbuf *res, struct err *e)
{
	uint64_t addr, length;
	if (get_range(r, &addr, &length, e))
		return -1;
	if (length == 0)
		return fail(e, EINVAL, "splice: length must be > 0");
	int fds[2];
	if (pipe2(fds, O_CLOEXEC | O_NONBLOCK) < 0) {
		int en = errno;
		return fail(e, en, "splice: pipe: %s", strerror(en));
	}
	uint64_t want = length + 2 * (uint64_t)g_page_size, max = pipe_max_size();
	if (want > max)
		want = max;
	fcntl(fds[1], F_SETPIPE_SZ, (int)want); /* best effort: splice what fits */
	struct iovec iov = {(void *)(uintptr_t)addr, length};
	uint64_t total = 0;
	while (iov.iov_len > 0) {
		ssize_t n = vmsplice(fds[1], &iov, 1, SPLICE_F_NONBLOCK);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && errno == EAGAIN && total > 0)
			break;
		if (n <= 0) {
			int en = n < 0 ? errno : EIO;
			close(fds[0]);
			close(fds[1]);
			return fail(e, en, "splice 0x%" PRIx64 "+%" PRIu64 ": vmsplice: %s", addr, length,
				    strerror(en));
		}
		total += (uint64_t)n;
		iov.iov_base = (char *)iov.iov_base + n;
		iov.iov_len -= (size_t)n;
	}
	int id = handle_add(g_pipes, &g_next_pipe, fds[0], fds[1]);
	if (id < 0) {
		close(fds[0]);
		close(fds[1]);
		return fail(e, EMFILE, "splice: more than %d pipes in one process", MAX_HANDLES);
	}
	res_i64(res, "pipe", id);
	res_u64(res, "bytes", total);
	return 0;
}

static int cmd_drain(struct req *r, struct sbuf *res, struct err *e)
{
	uint64_t id;
	if (get_u64(r, "pipe", true, 0, &id, e))
		return -1;
	struct handle *h = handle_find(g_pipes, id);
	if (!h)
		return fail(e, ENOENT, "drain: no pipe %" PRIu64, id);
	close(h->fd[1]); /* no writer left: read() returns 0 once empty */
	static char buf[64 * 1024];
	uint64_t total = 0;
	int en = 0;
	for (;;) {
		ssize_t n = read(h->fd[0], buf, sizeof buf);
		if (n > 0)
			total += (uint64_t)n;
		else if (n < 0 && errno == EINTR)
			continue;
		else {
			en = n < 0 ? errno : 0;
			break;
		}
	}
	close(h->fd[0]);
	h->id = 0;
	if (en)
		return fail(e, en, "drain %" PRIu64 ": read: %s", id, strerror(en));
	res_u64(res, "bytes", total);
	return 0;
}

/* Reads the worker's own pagemap, so the answer is ordered after every
 * earlier command for this process. */
static int cmd_pagemap(struct req *r, struct sbuf *res, struct err *e)
{
	const uint64_t *addrs;
	size_t n;
	if (get_array(r, "addrs", &addrs, &n, e))
		return -1;
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		int en = errno;
		return fail(e, en, "pagemap: open /proc/self/pagemap: %s", strerror(en));
	}
	res_key(res, "entries");
	sb_putc(res, '[');
	for (size_t i = 0; i < n; i++) {
		uint64_t raw = 0;
		off_t off = (off_t)(addrs[i] / (uint64_t)g_page_size * 8);
		if (pread(fd, &raw, sizeof raw, off) != (ssize_t)sizeof raw)
			raw = 0; /* beyond the address space: nothing there */
		bool present = raw >> 63 & 1;
		sb_printf(res, "%s{\"addr\":%" PRIu64 ",\"raw\":%" PRIu64 ",\"present\":%s,\"pfn\":",
			  i ? "," : "", addrs[i], raw, present ? "true" : "false");
		if (present)
			sb_printf(res, "%" PRIu64 "}", (uint64_t)(raw & ((1ULL << 55) - 1)));
		else
			sb_puts(res, "null}");
	}
	sb_putc(res, ']');
	close(fd);
	return 0;
}

/* ------------------------------------------------------------------------ */
/* Agent-side commands.                                                     */

static bool g_poweroff_requested;

static int cmd_ping(struct req *r, struct sbuf *res, struct err *e)
{
	struct utsname u;
	(void)r;
	if (uname(&u) < 0) {
		int en = errno;
		return fail(e, en, "ping: uname: %s", strerror(en));
	}
	res_str(res, "release", u.release);
	res_i64(res, "pid", getpid());
	return 0;
}

static int cmd_echo(struct req *r, struct sbuf *res, struct err *e)
{
	struct jval *v = arg(r, "text");
	if (arg_type(r, "text", v, J_STR, e))
		return -1;
	res_key(res, "text");
	sb_json_str(res, v->str, v->len);
	return 0;
}

/* kmsg: write one line to the kernel log (/dev/kmsg), as kselftests do, so
 * the host can mark the log or test that it records kernel complaints. */
static int cmd_kmsg(struct req *r, struct sbuf *res, struct err *e)
{
	struct jval *v = arg(r, "text");
	if (arg_type(r, "text", v, J_STR, e))
		return -1;
	int fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
	if (fd < 0) {
		int en = errno;
		return fail(e, en, "kmsg: open /dev/kmsg: %s", strerror(en));
	}
	ssize_t n = write(fd, v->str, v->len);
	int en = errno;
	close(fd);
	if (n < 0)
		return fail(e, en, "kmsg: write: %s", strerror(en));
	res_i64(res, "bytes", n);
	return 0;
}

/* sysfs: write a string to one file under /sys (unbind a dax device, say):
 * the kernel's own knobs, nothing else on the guest. */
static int cmd_sysfs(struct req *r, struct sbuf *res, struct err *e)
{
	const char *path, *text;
	if (get_str(r, "path", &path, e) || get_str(r, "text", &text, e))
		return -1;
	if (strncmp(path, "/sys/", 5) != 0 || strstr(path, "/../"))
		return fail(e, EINVAL, "sysfs: %s is not a file under /sys", path);
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	if (fd < 0) {
		int en = errno;
		return fail(e, en, "sysfs: open %s: %s", path, strerror(en));
	}
	ssize_t n = write(fd, text, strlen(text));
	int en = errno;
	close(fd);
	if (n < 0)
		return fail(e, en, "sysfs: write %s: %s", path, strerror(en));
	res_i64(res, "bytes", n);
	return 0;
}

static int read_text(const char *dir, const char *name, const char *file, char *buf, size_t size)
{
	char path[PATH_MAX];
	snprintf(path, sizeof path, "%s/%s/%s", dir, name, file);
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, size - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = '\0';
	return 0;
}

/* Numbers sysfs cannot give us become null rather than failing the list. */
static void res_sysfs_num(struct sbuf *res, const char *key, const char *name, const char *file,
			  int base)
{
	char buf[64], *end;
	res_key(res, key);
	if (read_text(g_sysfs_dax, name, file, buf, sizeof buf) == 0) {
		errno = 0;
		unsigned long long v = strtoull(buf, &end, base);
		if (errno == 0 && end != buf && (*end == '\0' || *end == '\n')) {
			sb_printf(res, "%llu", v);
			return;
		}
	}
	sb_puts(res, "null");
}

/* /sys/bus/dax/devices/daxX.Y links to .../regionN/daxX.Y: the region is the
 * "regionN" component of the link target. */
static void res_region(struct sbuf *res, const char *name)
{
	char path[PATH_MAX], target[PATH_MAX];
	snprintf(path, sizeof path, "%s/%s", g_sysfs_dax, name);
	ssize_t n = readlink(path, target, sizeof target - 1);
	res_key(res, "region");
	if (n > 0) {
		target[n] = '\0';
		for (char *c = strtok(target, "/"); c; c = strtok(NULL, "/")) {
			if (strncmp(c, "region", 6) == 0 && c[6] &&
			    strspn(c + 6, "0123456789") == strlen(c + 6)) {
				sb_json_str(res, c, strlen(c));
				return;
			}
		}
	}
	sb_puts(res, "null");
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static int cmd_namespaces(struct req *r, struct sbuf *res, struct err *e)
{
	(void)r;
	DIR *d = opendir(g_sysfs_dax);
	if (!d) {
		int en = errno;
		return fail(e, en, "namespaces: opendir %s: %s", g_sysfs_dax, strerror(en));
	}
	char *names[MAX_DEVICES];
	size_t n = 0;
	struct dirent *de;
	while ((de = readdir(d)) && n < MAX_DEVICES)
		if (de->d_name[0] != '.' && (names[n] = strdup(de->d_name)))
			n++;
	closedir(d);
	qsort(names, n, sizeof names[0], cmp_str);
	res_key(res, "devices");
	sb_putc(res, '[');
	bool first = true;
	for (size_t i = 0; i < n; i++) {
		if (!names[i])
			continue;
		sb_puts(res, first ? "{\"name\":" : ",{\"name\":");
		first = false;
		sb_json_str(res, names[i], strlen(names[i]));
		res_sysfs_num(res, "size", names[i], "size", 10);
		res_sysfs_num(res, "align", names[i], "align", 10);
		res_sysfs_num(res, "start", names[i], "resource", 16);
		res_region(res, names[i]);
		sb_putc(res, '}');
		free(names[i]);
	}
	sb_putc(res, ']');
	return 0;
}

/* ------------------------------------------------------------------------ */
/* Programs from the host: "put" writes a file (base64, in chunks) into the  */
/* files directory, "run" executes one with arguments, a timeout and its     */
/* output captured.  Names are plain file names: nothing outside that       */
/* directory is written or run.                                             */

#define MAX_OUTPUT (1u << 20) /* bytes kept per stream; the rest is counted */

static int b64_value(unsigned char c)
{
	if (c >= 'A' && c <= 'Z') return c - 'A';
	if (c >= 'a' && c <= 'z') return c - 'a' + 26;
	if (c >= '0' && c <= '9') return c - '0' + 52;
	if (c == '+') return 62;
	if (c == '/') return 63;
	return -1;
}

/* Standard base64 with padding; returns the decoded length or -1. */
static ssize_t b64_decode(const char *in, size_t n, unsigned char *out)
{
	size_t o = 0;
	if (n % 4)
		return -1;
	for (size_t i = 0; i < n; i += 4) {
		int v[4];
		for (int k = 0; k < 4; k++) {
			v[k] = in[i + k] == '=' && i + 4 == n && k >= 2 ? 0 : b64_value((unsigned char)in[i + k]);
			if (v[k] < 0)
				return -1;
		}
		if (in[i + 2] == '=' && in[i + 3] != '=')
			return -1;
		uint32_t w = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 | (uint32_t)v[3];
		out[o++] = (unsigned char)(w >> 16);
		if (in[i + 2] != '=')
			out[o++] = (unsigned char)(w >> 8);
		if (in[i + 3] != '=')
			out[o++] = (unsigned char)w;
	}
	return (ssize_t)o;
}

static void sb_b64(struct sbuf *b, const unsigned char *in, size_t n)
{
	static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
	sb_putc(b, '"');
	for (size_t i = 0; i < n; i += 3) {
		uint32_t w = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0) |
			     (i + 2 < n ? in[i + 2] : 0);
		char q[4] = {tab[w >> 18 & 63], tab[w >> 12 & 63], i + 1 < n ? tab[w >> 6 & 63] : '=',
			     i + 2 < n ? tab[w & 63] : '='};
		sb_putn(b, q, 4);
	}
	sb_putc(b, '"');
}

static int file_path(const char *cmd, const char *name, char *path, size_t size, struct err *e)
{
	if (!valid_name(name))
		return fail(e, EINVAL, "%s: bad file name '%s' (letters, digits, _ - . only)", cmd, name);
	snprintf(path, size, "%s/%s", g_files_dir, name);
	return 0;
}

static int cmd_put(struct req *r, struct sbuf *res, struct err *e)
{
	const char *name, *data;
	bool append;
	char path[PATH_MAX];
	if (get_str(r, "name", &name, e) || get_str(r, "data", &data, e) ||
	    get_bool(r, "append", false, false, &append, e) ||
	    file_path("put", name, path, sizeof path, e))
		return -1;
	size_t n = strlen(data);
	unsigned char *buf = malloc(n / 4 * 3 + 3);
	if (!buf)
		return fail(e, ENOMEM, "put %s: out of memory", name);
	ssize_t len = b64_decode(data, n, buf);
	if (len < 0) {
		free(buf);
		return fail(e, EINVAL, "put %s: data is not base64", name);
	}
	if (mkdir(g_files_dir, 0700) < 0 && errno != EEXIST) {
		int en = errno;
		free(buf);
		return fail(e, en, "put %s: mkdir %s: %s", name, g_files_dir, strerror(en));
	}
	int fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : O_TRUNC), 0700);
	if (fd < 0) {
		int en = errno;
		free(buf);
		return fail(e, en, "put %s: open %s: %s", name, path, strerror(en));
	}
	ssize_t off = 0;
	while (off < len) {
		ssize_t w = write(fd, buf + off, (size_t)(len - off));
		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0) {
			int en = w < 0 ? errno : EIO;
			close(fd);
			free(buf);
			return fail(e, en, "put %s: write: %s", name, strerror(en));
		}
		off += w;
	}
	free(buf);
	struct stat st;
	int en = fstat(fd, &st) < 0 ? errno : 0;
	/* a file written by an earlier put with another mode is made runnable too */
	if (!en && fchmod(fd, 0700) < 0)
		en = errno;
	close(fd);
	if (en)
		return fail(e, en, "put %s: %s", name, strerror(en));
	res_u64(res, "size", (uint64_t)st.st_size);
	return 0;
}

struct capture {
	int fd;
	unsigned char *buf;
	size_t len;
	uint64_t total;
};

static void capture_read(struct capture *c)
{
	unsigned char tmp[16384];
	ssize_t n = read(c->fd, tmp, sizeof tmp);
	if (n < 0 && (errno == EINTR || errno == EAGAIN))
		return;
	if (n <= 0) {
		close(c->fd);
		c->fd = -1;
		return;
	}
	size_t keep = c->len < MAX_OUTPUT ? MAX_OUTPUT - c->len : 0;
	if (keep > (size_t)n)
		keep = (size_t)n;
	memcpy(c->buf + c->len, tmp, keep);
	c->len += keep;
	c->total += (uint64_t)n;
}

static int64_t now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The agent ignores SIGCHLD (the kernel reaps its workers), so it cannot
 * wait for a child's status.  A helper child restores SIGCHLD, starts the
 * program in a process group of its own, waits with the timeout (killing
 * the whole group when it expires) and writes the wait status to a pipe. */
static void run_helper(const char *path, char *const *args, size_t nargs, int out, int err,
		       int status_fd, int64_t timeout_ms) __attribute__((noreturn));

static void run_helper(const char *path, char *const *args, size_t nargs, int out, int err,
		       int status_fd, int64_t timeout_ms)
{
	signal(SIGCHLD, SIG_DFL);
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	pid_t pid = fork();
	if (pid == 0) {
		setpgid(0, 0);
		char **argv = calloc(nargs + 2, sizeof *argv);
		if (!argv)
			_exit(127);
		argv[0] = (char *)path;
		for (size_t i = 0; i < nargs; i++)
			argv[i + 1] = args[i];
		char *envp[] = {"PATH=/bin:/sbin:/usr/bin", NULL};
		int null = open("/dev/null", O_RDONLY);
		dup2(null, 0);
		dup2(out, 1);
		dup2(err, 2);
		if (chdir(g_files_dir) < 0) { /* the run goes on from / */ }
		signal(SIGPIPE, SIG_DFL);
		execve(path, argv, envp);
		dprintf(2, "agent run: execve %s: %s\n", path, strerror(errno));
		_exit(127);
	}
	int result[3] = {-1, 0, 0}; /* wait status, timed out, errno of fork */
	if (pid < 0) {
		result[2] = errno;
	} else {
		setpgid(pid, pid); /* either side may get there first */
		close(out);
		close(err);
		int64_t deadline = now_ms() + timeout_ms;
		int st;
		for (;;) {
			pid_t w = waitpid(pid, &st, WNOHANG);
			if (w == pid) {
				result[0] = st;
				break;
			}
			if (now_ms() >= deadline) {
				kill(-pid, SIGKILL);
				waitpid(pid, &st, 0);
				result[0] = st;
				result[1] = 1;
				break;
			}
			struct timespec ts = {0, 2000000}; /* 2 ms */
			nanosleep(&ts, NULL);
		}
		kill(-pid, SIGKILL); /* nothing of the program outlives the run */
	}
	if (write(status_fd, result, sizeof result) < 0)
		_exit(1);
	_exit(0);
}

static int cmd_run(struct req *r, struct sbuf *res, struct err *e)
{
	const char *name;
	char *const *args;
	size_t nargs;
	uint64_t timeout_ms;
	char path[PATH_MAX];
	if (get_str(r, "name", &name, e) || get_strs(r, "args", &args, &nargs, e) ||
	    get_u64(r, "timeout_ms", false, 60000, &timeout_ms, e) ||
	    file_path("run", name, path, sizeof path, e))
		return -1;
	if (timeout_ms == 0 || timeout_ms > 3600 * 1000)
		return fail(e, EINVAL, "run %s: timeout_ms must be 1..3600000", name);
	if (access(path, X_OK) < 0) {
		int en = errno;
		return fail(e, en, "run %s: %s: %s (send it with put first)", name, path, strerror(en));
	}
	int po[2], pe[2], ps[2];
	if (pipe2(po, O_CLOEXEC) < 0 || pipe2(pe, O_CLOEXEC) < 0 || pipe2(ps, O_CLOEXEC) < 0) {
		int en = errno;
		return fail(e, en, "run %s: pipe: %s", name, strerror(en));
	}
	struct capture cap[2] = {{po[0], malloc(MAX_OUTPUT), 0, 0}, {pe[0], malloc(MAX_OUTPUT), 0, 0}};
	int64_t started = now_ms();
	pid_t helper = cap[0].buf && cap[1].buf ? fork() : -2;
	if (helper == 0) {
		close(po[0]);
		close(pe[0]);
		close(ps[0]);
		run_helper(path, args, nargs, po[1], pe[1], ps[1], (int64_t)timeout_ms);
	}
	int en = helper == -2 ? ENOMEM : errno;
	close(po[1]);
	close(pe[1]);
	close(ps[1]);
	if (helper < 0) {
		close(po[0]);
		close(pe[0]);
		close(ps[0]);
		free(cap[0].buf);
		free(cap[1].buf);
		return fail(e, en, "run %s: fork: %s", name, strerror(en));
	}
	/* Read output until the status arrives; then take what is left in the
	 * pipes without waiting for a writer that outlived the program. */
	int result[3] = {-1, 0, 0};
	ssize_t got = 0;
	for (;;) {
		struct pollfd pfd[3] = {{ps[0], POLLIN, 0}, {cap[0].fd, POLLIN, 0}, {cap[1].fd, POLLIN, 0}};
		if (poll(pfd, 3, -1) < 0 && errno != EINTR)
			break;
		for (int k = 0; k < 2; k++)
			if (cap[k].fd >= 0 && pfd[k + 1].revents)
				capture_read(&cap[k]);
		if (pfd[0].revents) {
			got = read(ps[0], result, sizeof result);
			break;
		}
	}
	close(ps[0]);
	for (int k = 0; k < 2; k++) {
		if (cap[k].fd < 0)
			continue;
		fcntl(cap[k].fd, F_SETFL, O_NONBLOCK);
		while (cap[k].fd >= 0) {
			size_t before = (size_t)cap[k].total;
			capture_read(&cap[k]);
			if (cap[k].fd >= 0 && cap[k].total == before) {
				close(cap[k].fd);
				cap[k].fd = -1;
			}
		}
	}
	int64_t elapsed = now_ms() - started;
	int rc = 0;
	if (got != (ssize_t)sizeof result)
		rc = fail(e, EIO, "run %s: the helper process died without a status", name);
	else if (result[2])
		rc = fail(e, result[2], "run %s: fork: %s", name, strerror(result[2]));
	if (rc == 0) {
		int st = result[0];
		res_key(res, "status");
		if (WIFEXITED(st))
			sb_printf(res, "%d", WEXITSTATUS(st));
		else
			sb_puts(res, "null");
		res_key(res, "signal");
		if (WIFSIGNALED(st))
			sb_printf(res, "%d", WTERMSIG(st));
		else
			sb_puts(res, "null");
		res_key(res, "timed_out");
		sb_puts(res, result[1] ? "true" : "false");
		res_i64(res, "elapsed_ms", elapsed);
		res_key(res, "stdout");
		sb_b64(res, cap[0].buf, cap[0].len);
		res_key(res, "stderr");
		sb_b64(res, cap[1].buf, cap[1].len);
		res_u64(res, "stdout_bytes", cap[0].total);
		res_u64(res, "stderr_bytes", cap[1].total);
	}
	free(cap[0].buf);
	free(cap[1].buf);
	return rc;
}

static int cmd_poweroff(struct req *r, struct sbuf *res, struct err *e)
{
	(void)r;
	(void)res;
	if (getpid() != 1 && !g_allow_poweroff)
		return fail(e, EPERM, "poweroff: refused: the agent is not PID 1 "
				      "(start it with --allow-poweroff)");
	g_poweroff_requested = true; /* the main loop answers first, then powers off */
	return 0;
}

static int cmd_procs(struct req *r, struct sbuf *res, struct err *e);
static int cmd_kill(struct req *r, struct sbuf *res, struct err *e);

/* ------------------------------------------------------------------------ */
/* The command table.  AT_WORKER commands name a process in "proc"; the     */
/* agent relays them to that worker, which runs the handler.                */

enum where { AT_AGENT, AT_WORKER };
enum kind { K_PLAIN, K_CREATE, K_FORK, K_EXIT };

struct cmd {
	const char *name;
	enum where where;
	enum kind kind;
	int (*fn)(struct req *r, struct sbuf *res, struct err *e);
};

static const struct cmd g_cmds[] = {
	{"ping", AT_AGENT, K_PLAIN, cmd_ping},
	{"echo", AT_AGENT, K_PLAIN, cmd_echo},
	{"kmsg", AT_AGENT, K_PLAIN, cmd_kmsg},
	{"sysfs", AT_AGENT, K_PLAIN, cmd_sysfs},
	{"namespaces", AT_AGENT, K_PLAIN, cmd_namespaces},
	{"procs", AT_AGENT, K_PLAIN, cmd_procs},
	{"poweroff", AT_AGENT, K_PLAIN, cmd_poweroff},
	{"put", AT_AGENT, K_PLAIN, cmd_put},
	{"run", AT_AGENT, K_PLAIN, cmd_run},
	{"mmap", AT_WORKER, K_CREATE, cmd_mmap},
	{"touch", AT_WORKER, K_PLAIN, cmd_touch},
	{"fork", AT_WORKER, K_FORK, cmd_fork},
	{"munmap", AT_WORKER, K_PLAIN, cmd_munmap},
	{"madvise", AT_WORKER, K_PLAIN, cmd_madvise},
	{"mprotect", AT_WORKER, K_PLAIN, cmd_mprotect},
	{"mremap", AT_WORKER, K_PLAIN, cmd_mremap},
	{"mlock", AT_WORKER, K_PLAIN, cmd_mlock},
	{"munlock", AT_WORKER, K_PLAIN, cmd_munlock},
	{"maps", AT_WORKER, K_PLAIN, cmd_maps},
	{"exit", AT_WORKER, K_EXIT, cmd_exit},
	{"pin", AT_WORKER, K_PLAIN, cmd_pin},
	{"unpin", AT_WORKER, K_PLAIN, cmd_unpin},
	{"splice", AT_WORKER, K_PLAIN, cmd_splice},
	{"drain", AT_WORKER, K_PLAIN, cmd_drain},
	{"pagemap", AT_WORKER, K_PLAIN, cmd_pagemap},
	{"signals", AT_WORKER, K_PLAIN, cmd_signals},
	{"kill", AT_AGENT, K_PLAIN, cmd_kill},
};

static const struct cmd *find_cmd(const char *name)
{
	for (size_t i = 0; i < sizeof g_cmds / sizeof g_cmds[0]; i++)
		if (strcmp(g_cmds[i].name, name) == 0)
			return &g_cmds[i];
	return NULL;
}

/* ------------------------------------------------------------------------ */
/* Channels between agent and workers: SOCK_SEQPACKET socketpairs, one       */
/* message per request or reply, fds passed with SCM_RIGHTS.                */

static int make_channel(int sv[2], struct err *e, const char *cmd)
{
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
		int en = errno;
		return fail(e, en, "%s: socketpair: %s", cmd, strerror(en));
	}
	/* Big messages (pagemap replies) need a big send buffer; FORCE works as
	 * root, otherwise we live with the default and long replies fail E2BIG. */
	int sz = (int)MAX_MSG + 65536;
	for (int i = 0; i < 2; i++)
		if (setsockopt(sv[i], SOL_SOCKET, SO_SNDBUFFORCE, &sz, sizeof sz) < 0)
			setsockopt(sv[i], SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
	return 0;
}

static ssize_t send_msg(int fd, const void *buf, size_t len, int passfd, int flags)
{
	struct iovec iov = {(void *)buf, len};
	union {
		struct cmsghdr h;
		char buf[CMSG_SPACE(sizeof(int))];
	} cm;
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
	if (passfd >= 0) {
		memset(&cm, 0, sizeof cm);
		mh.msg_control = cm.buf;
		mh.msg_controllen = sizeof cm.buf;
		struct cmsghdr *c = CMSG_FIRSTHDR(&mh);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &passfd, sizeof(int));
	}
	return sendmsg(fd, &mh, flags | MSG_NOSIGNAL);
}

static ssize_t recv_msg(int fd, void *buf, size_t size, int *passfd, int flags)
{
	struct iovec iov = {buf, size};
	union {
		struct cmsghdr h;
		char buf[CMSG_SPACE(sizeof(int) * 4)];
	} cm;
	struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cm.buf,
			    .msg_controllen = sizeof cm.buf};
	*passfd = -1;
	ssize_t n = recvmsg(fd, &mh, flags | MSG_CMSG_CLOEXEC);
	for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); n >= 0 && c; c = CMSG_NXTHDR(&mh, c)) {
		if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
			continue;
		size_t nfd = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		for (size_t i = 0; i < nfd; i++) {
			int f;
			memcpy(&f, CMSG_DATA(c) + i * sizeof(int), sizeof f);
			if (*passfd < 0)
				*passfd = f;
			else
				close(f);
		}
	}
	if (n >= 0 && (mh.msg_flags & MSG_TRUNC)) {
		errno = EMSGSIZE;
		return -1;
	}
	return n;
}

/* A worker keeps only its channel (as fd 3) and stderr; stdin and stdout
 * become /dev/null so the host sees EOF as soon as the agent dies. */
static int isolate_fds(int chan)
{
	if (chan != 3) {
		if (dup2(chan, 3) < 0)
			_exit(111);
		close(chan);
	}
	if (close_range(4, ~0U, 0) < 0)
		for (int fd = 4; fd < 1024; fd++)
			close(fd);
	int null = open("/dev/null", O_RDWR);
	if (null >= 0) {
		dup2(null, 0);
		dup2(null, 1);
		if (null > 3)
			close(null);
	}
	return 3;
}

static void worker_loop(int chan) __attribute__((noreturn));

static void worker_start(int chan, const char *name)
{
	/* Die with the agent: every worker is the agent's child (forked ones
	 * too, by CLONE_PARENT). */
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() != g_agent_pid)
		_exit(0);
	char comm[16];
	snprintf(comm, sizeof comm, "w:%s", name);
	prctl(PR_SET_NAME, comm);
	chan = isolate_fds(chan);
	/* Inherited rings and pipes were closed with the other fds: a forked
	 * child starts with no pins and no pipes of its own. */
	memset(g_pins, 0, sizeof g_pins);
	memset(g_pipes, 0, sizeof g_pipes);
	g_recv_fd = -1;
	g_exit_after_reply = false;
	install_fault_handlers();
	worker_loop(chan);
}

static void worker_handle(char *msg, size_t len, struct sbuf *reply)
{
	struct req r;
	struct err e = {0};
	struct sbuf res = {0};
	struct sbuf sigs = {0};
	memset(&r, 0, sizeof r);
	g_unarmed_repeats = 0;
	int rc = parse_request(msg, len, &r, &e);
	const struct cmd *c = rc ? NULL : find_cmd(r.cmd);
	if (rc == 0 && (!c || c->where != AT_WORKER))
		rc = fail(&e, EINVAL, "worker: unknown command '%s'", r.cmd);
	if (rc == 0)
		rc = c->fn(&r, &res, &e);
	drain_signals(&sigs); /* what came during this request, or since the last reply */
	build_response(reply, r.has_id ? r.id : -1, rc, &res, &e, r.cmd ? r.cmd : "?", &sigs);
	sb_free(&sigs);
	sb_free(&res);
	jobj_free(&r.obj);
}

static void worker_loop(int chan)
{
	char *buf = malloc(MAX_MSG + 1);
	if (!buf)
		_exit(112);
	for (;;) {
		int fd;
		ssize_t n = recv_msg(chan, buf, MAX_MSG, &fd, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			_exit(0); /* the agent is gone */
		buf[n] = '\0';
		g_recv_fd = fd;
		struct sbuf reply = {0};
		worker_handle(buf, (size_t)n, &reply);
		if (g_recv_fd >= 0)
			close(g_recv_fd);
		g_recv_fd = -1;
		if (reply.oom || send_msg(chan, reply.p, reply.len, -1, 0) < 0) {
			if (!reply.oom && (errno == EPIPE || errno == ECONNRESET))
				_exit(0);
			/* Too big for the channel: say so instead of staying silent. */
			struct err e = {0};
			struct sbuf res = {0}, small = {0};
			struct req r;
			memset(&r, 0, sizeof r);
			parse_request(buf, (size_t)n, &r, &e);
			fail(&e, E2BIG, "%s: reply of %zu bytes does not fit the channel",
			     r.cmd ? r.cmd : "?", reply.len);
			build_response(&small, r.has_id ? r.id : -1, -1, &res, &e, "?", NULL);
			send_msg(chan, small.p, small.len, -1, 0);
			sb_free(&small);
			jobj_free(&r.obj);
		}
		sb_free(&reply);
		if (g_exit_after_reply)
			_exit(g_exit_status);
	}
}

/* ------------------------------------------------------------------------ */
/* Agent: process table, routing and relaying.                              */

enum pstate { P_FREE, P_LIVE, P_DEAD };

struct pending {
	int64_t id;
	const struct cmd *cmd;
	int child;          /* K_FORK: slot of the child */
	unsigned child_gen; /* ... as long as the slot still holds it */
};

struct proc {
	enum pstate state;
	char name[NAME_LEN];
	pid_t pid; /* 0 until a forked child's pid is known */
	int fd;    /* agent's end of the channel */
	unsigned gen;
	struct pending q[MAX_PENDING]; /* requests relayed, replies not yet seen */
	int qhead, qlen;
	bool reaped; /* wait() returned its status: */
	int wstatus; /* how it ended (exit status or the signal that killed it) */
};

static struct proc g_procs[MAX_PROCS];
static int g_in = -1, g_out = -1;
static bool g_stdio; /* "-": EOF on stdin means the host is done */
static char *g_relay_buf;

static void send_line(struct sbuf *line)
{
	sb_putc(line, '\n');
	if (line->oom)
		return;
	size_t off = 0;
	while (off < line->len) {
		ssize_t n = write(g_out, line->p + off, line->len - off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			if (g_stdio)
				exit(0); /* the host hung up */
			fprintf(stderr, "agent: write to host: %s\n", strerror(errno));
			return;
		}
		off += (size_t)n;
	}
}

static void agent_reply(int64_t id, int rc, struct sbuf *res, struct err *e, const char *cmd)
{
	struct sbuf line = {0};
	build_response(&line, id, rc, res, e, cmd, NULL);
	send_line(&line);
	sb_free(&line);
}

static void agent_error(int64_t id, struct err *e)
{
	struct sbuf none = {0};
	agent_reply(id, -1, &none, e, "?");
}

static struct proc *proc_find(const char *name)
{
	for (int i = 0; i < MAX_PROCS; i++)
		if (g_procs[i].state != P_FREE && strcmp(g_procs[i].name, name) == 0)
			return &g_procs[i];
	return NULL;
}

/* A name whose process exited is remembered (so commands for it get ESRCH)
 * until mmap or fork reuses it; its slot is recycled when the table fills. */
static struct proc *proc_alloc(const char *name)
{
	struct proc *p = proc_find(name);
	if (p && p->state == P_LIVE)
		return NULL;
	for (int i = 0; !p && i < MAX_PROCS; i++)
		if (g_procs[i].state == P_FREE)
			p = &g_procs[i];
	for (int i = 0; !p && i < MAX_PROCS; i++)
		if (g_procs[i].state == P_DEAD)
			p = &g_procs[i];
	if (!p)
		return NULL;
	unsigned gen = p->gen + 1;
	memset(p, 0, sizeof *p);
	p->gen = gen;
	p->state = P_LIVE;
	p->fd = -1;
	snprintf(p->name, sizeof p->name, "%s", name);
	return p;
}

/* Every worker is the agent's child (CLONE_PARENT for forked ones), and the
 * agent reaps them itself, so that it knows how each one ended: a worker the
 * kernel killed (SIGKILL from the OOM killer or memory_failure(), a SIGBUS it
 * could not survive) is reported by "procs" with the signal. */
static void note_death(pid_t pid, int wstatus)
{
	for (int i = 0; i < MAX_PROCS; i++) {
		struct proc *p = &g_procs[i];
		if (p->state != P_FREE && p->pid == pid && !p->reaped) {
			p->reaped = true;
			p->wstatus = wstatus;
			return;
		}
	}
}

static void reap_children(void)
{
	int st;
	pid_t pid;
	while ((pid = waitpid(-1, &st, WNOHANG)) > 0)
		note_death(pid, st);
}

/* Wait (5 s at most) until *pid* has ended and is reaped: its /proc entry
 * and its mm are gone, so the host's next step and snapshot see the exit
 * complete, not a page table teardown still running. */
static void wait_gone(pid_t pid)
{
	for (int i = 0; i < 5000; i++) {
		int st;
		pid_t w = waitpid(pid, &st, WNOHANG);
		if (w == pid) {
			note_death(pid, st);
			return;
		}
		if (w < 0 && kill(pid, 0) < 0)
			return; /* not our child (reaped already) and gone */
		struct timespec ts = {0, 1000000}; /* 1 ms */
		nanosleep(&ts, NULL);
	}
}

/* The worker is gone (or never came to be): every request still waiting for
 * it is answered with ESRCH, and a child it was forking is forgotten. */
static void proc_close(struct proc *p, enum pstate final)
{
	if (p->fd >= 0)
		close(p->fd);
	p->fd = -1;
	p->state = final;
	if (final == P_DEAD && p->pid > 0 && !p->reaped)
		wait_gone(p->pid); /* its channel closed: it is exiting, learn how */
	while (p->qlen > 0) {
		struct pending pd = p->q[p->qhead];
		p->qhead = (p->qhead + 1) % MAX_PENDING;
		p->qlen--;
		struct err e;
		fail(&e, ESRCH, "%s: process %s has exited", pd.cmd->name, p->name);
		agent_error(pd.id, &e);
		struct proc *c = &g_procs[pd.child];
		if (pd.cmd->kind == K_FORK && c->gen == pd.child_gen && c->state == P_LIVE)
			proc_close(c, P_FREE);
	}
}

static struct proc *spawn_worker(const char *name, struct err *e)
{
	int sv[2];
	struct proc *p = proc_alloc(name);
	if (!p) {
		fail(e, EMFILE, "mmap: cannot create process %s: table full", name);
		return NULL;
	}
	if (make_channel(sv, e, "mmap")) {
		p->state = P_FREE;
		return NULL;
	}
	pid_t pid = fork();
	if (pid < 0) {
		int en = errno;
		close(sv[0]);
		close(sv[1]);
		p->state = P_FREE;
		fail(e, en, "mmap: fork for process %s: %s", name, strerror(en));
		return NULL;
	}
	if (pid == 0) {
		close(sv[0]);
		worker_start(sv[1], name);
	}
	close(sv[1]);
	p->fd = sv[0];
	p->pid = pid;
	return p;
}

/* fork: make the child's channel now and hand one end to the parent worker
 * with the request; the child's slot exists at once, so commands for it can
 * queue on its channel before the fork even happened. */
static struct proc *prepare_child(struct req *r, struct proc *parent, int *passfd, struct err *e)
{
	const char *child;
	int sv[2];
	if (get_str(r, "child", &child, e))
		return NULL;
	if (!valid_name(child)) {
		fail(e, EINVAL, "fork: bad process name '%s'", child);
		return NULL;
	}
	struct proc *c = proc_find(child);
	if (c == parent || (c && c->state == P_LIVE)) {
		fail(e, EEXIST, "fork: process %s already exists", child);
		return NULL;
	}
	c = proc_alloc(child);
	if (!c) {
		fail(e, EMFILE, "fork: cannot create process %s: table full", child);
		return NULL;
	}
	if (make_channel(sv, e, "fork")) {
		c->state = P_FREE;
		return NULL;
	}
	c->fd = sv[0];
	*passfd = sv[1];
	return c;
}

static void on_worker_readable(struct proc *p);

static void route_to_worker(const struct cmd *c, struct req *r, const char *line, size_t len)
{
	struct err e = {0};
	const char *name;
	if (get_str(r, "proc", &name, &e))
		goto error;
	if (!valid_name(name)) {
		fail(&e, EINVAL, "%s: bad process name '%s'", c->name, name);
		goto error;
	}
	struct proc *p = proc_find(name);
	if (c->kind == K_CREATE && (!p || p->state == P_DEAD) && !(p = spawn_worker(name, &e)))
		goto error;
	if (!p) {
		fail(&e, ENOENT, "%s: no process named %s", c->name, name);
		goto error;
	}
	if (p->state != P_LIVE) {
		fail(&e, ESRCH, "%s: process %s has exited", c->name, name);
		goto error;
	}
	if (p->qlen == MAX_PENDING) {
		fail(&e, EAGAIN, "%s: process %s has %d requests in flight", c->name, name, MAX_PENDING);
		goto error;
	}
	int passfd = -1;
	struct proc *child = NULL;
	if (c->kind == K_FORK && !(child = prepare_child(r, p, &passfd, &e)))
		goto error;
	/* Non-blocking: a worker stuck in a fault must not freeze the agent. */
	ssize_t n = send_msg(p->fd, line, len, passfd, MSG_DONTWAIT);
	int en = errno;
	if (passfd >= 0)
		close(passfd);
	if (n < 0) {
		if (child)
			proc_close(child, P_FREE);
		if (en == EPIPE || en == ECONNRESET || en == ECONNREFUSED) {
			/* Gone, but its last replies may still be queued for us. */
			on_worker_readable(p);
			if (p->state == P_LIVE)
				proc_close(p, P_DEAD);
			fail(&e, ESRCH, "%s: process %s has exited", c->name, name);
		} else {
			fail(&e, en == EAGAIN ? EAGAIN : en, "%s: relay to process %s: %s", c->name,
			     name, strerror(en));
		}
		goto error;
	}
	struct pending *pd = &p->q[(p->qhead + p->qlen++) % MAX_PENDING];
	*pd = (struct pending){r->id, c, child ? (int)(child - g_procs) : 0, child ? child->gen : 0};
	return;
error:
	agent_error(r->id, &e);
}

/* A worker answers "exit" before it exits: wait_gone() waits for the exit. */

/* Relays one reply.  Replies come in request order, so the oldest pending
 * request is the one being answered.  fork and exit replies are also read by
 * the agent, to learn the child's pid or to forget the process. */
static void relay_reply(struct proc *p, ssize_t n)
{
	if (p->qlen == 0) {
		fprintf(stderr, "agent: unexpected message from %s dropped\n", p->name);
		return;
	}
	struct pending pd = p->q[p->qhead];
	p->qhead = (p->qhead + 1) % MAX_PENDING;
	p->qlen--;
	if (n < 0) {
		struct err e;
		fail(&e, E2BIG, "%s: reply from process %s is too long", pd.cmd->name, p->name);
		agent_error(pd.id, &e);
		return;
	}
	g_relay_buf[n] = '\0';

	struct jobj o;
	struct err e;
	bool ok = false;
	int64_t pid = 0;
	if (json_parse_object(g_relay_buf, (size_t)n, &o, &e) == 0) {
		struct jval *v = jobj_get(&o, "ok"), *pv = jobj_get(&o, "pid");
		ok = v && v->type == J_BOOL && v->b;
		if (pv && pv->type == J_INT && !pv->neg)
			pid = (int64_t)pv->u;
	}
	jobj_free(&o);
	if (pd.cmd->kind == K_EXIT && ok && pid > 0)
		wait_gone((pid_t)pid);

	struct sbuf line = {0};
	sb_putn(&line, g_relay_buf, (size_t)n);
	send_line(&line);
	sb_free(&line);

	struct proc *c = &g_procs[pd.child];
	if (pd.cmd->kind == K_FORK && c->gen == pd.child_gen && c->state == P_LIVE) {
		if (ok)
			c->pid = (pid_t)pid;
		else
			proc_close(c, P_FREE);
	}
	if (pd.cmd->kind == K_EXIT && ok)
		proc_close(p, P_DEAD);
}

/* Drains a worker's channel.  A worker that exits with requests still unread
 * makes our next recv fail once with ECONNRESET, but the replies it sent
 * before exiting are still queued behind that error: read on until EOF. */
static void on_worker_readable(struct proc *p)
{
	while (p->state == P_LIVE) {
		int fd;
		ssize_t n = recv_msg(p->fd, g_relay_buf, MAX_MSG, &fd, MSG_DONTWAIT);
		if (fd >= 0)
			close(fd);
		if (n < 0 && (errno == EINTR || errno == ECONNRESET))
			continue;
		if (n < 0 && errno == EAGAIN)
			return;
		if (n == 0 || (n < 0 && errno != EMSGSIZE)) {
			proc_close(p, P_DEAD);
			return;
		}
		relay_reply(p, n);
	}
}

static int cmd_procs(struct req *r, struct sbuf *res, struct err *e)
{
	(void)r;
	(void)e;
	bool first = true;
	res_key(res, "procs");
	sb_putc(res, '[');
	for (int i = 0; i < MAX_PROCS; i++) {
		struct proc *p = &g_procs[i];
		if (p->state != P_LIVE || p->pid <= 0)
			continue;
		sb_puts(res, first ? "{\"name\":" : ",{\"name\":");
		sb_json_str(res, p->name, strlen(p->name));
		sb_printf(res, ",\"pid\":%d}", (int)p->pid);
		first = false;
	}
	sb_putc(res, ']');
	/* "exited": how each remembered dead worker ended. */
	reap_children();
	first = true;
	res_key(res, "exited");
	sb_putc(res, '[');
	for (int i = 0; i < MAX_PROCS; i++) {
		struct proc *p = &g_procs[i];
		if (p->state != P_DEAD || p->pid <= 0)
			continue;
		sb_puts(res, first ? "{\"name\":" : ",{\"name\":");
		sb_json_str(res, p->name, strlen(p->name));
		sb_printf(res, ",\"pid\":%d,\"status\":", (int)p->pid);
		if (p->reaped && WIFEXITED(p->wstatus))
			sb_printf(res, "%d", WEXITSTATUS(p->wstatus));
		else
			sb_puts(res, "null");
		sb_puts(res, ",\"signal\":");
		if (p->reaped && WIFSIGNALED(p->wstatus))
			sb_printf(res, "%d,\"core\":%s}", WTERMSIG(p->wstatus),
				  WCOREDUMP(p->wstatus) ? "true" : "false");
		else
			sb_puts(res, "null,\"core\":false}");
		first = false;
	}
	sb_putc(res, ']');
	return 0;
}

/* kill: send a signal to a worker, as another process or the kernel would
 * (the OOM killer's SIGKILL, say).  For SIGKILL the answer waits until the
 * worker is gone, so the next snapshot sees it exited. */
static int cmd_kill(struct req *r, struct sbuf *res, struct err *e)
{
	const char *name;
	int64_t sig;
	if (get_str(r, "proc", &name, e) || get_i64(r, "signal", false, SIGKILL, &sig, e))
		return -1;
	if (sig < 1 || sig >= NSIG)
		return fail(e, EINVAL, "kill %s: signal %" PRId64 " out of range", name, sig);
	struct proc *p = proc_find(name);
	if (!p)
		return fail(e, ENOENT, "kill: no process named %s", name);
	if (p->state != P_LIVE || p->pid <= 0)
		return fail(e, ESRCH, "kill: process %s has exited", name);
	if (kill(p->pid, (int)sig) < 0) {
		int en = errno;
		return fail(e, en, "kill %s: %s", name, strerror(en));
	}
	if (sig == SIGKILL) {
		wait_gone(p->pid);
		on_worker_readable(p); /* the channel's EOF: answers what was pending */
	}
	res_i64(res, "pid", p->pid);
	return 0;
}

static void handle_host_line(char *line, size_t len)
{
	while (len > 0 && (line[len - 1] == '\r' || line[len - 1] == ' ' || line[len - 1] == '\t'))
		len--;
	line[len] = '\0';
	if (strspn(line, " \t") == len)
		return; /* blank lines are harmless */
	struct req r;
	struct err e = {0};
	memset(&r, 0, sizeof r);
	if (parse_request(line, len, &r, &e)) {
		agent_error(r.has_id ? r.id : -1, &e);
	} else {
		const struct cmd *c = find_cmd(r.cmd);
		if (!c) {
			fail(&e, EINVAL, "unknown command '%s'", r.cmd);
			agent_error(r.id, &e);
		} else if (c->where == AT_WORKER) {
			route_to_worker(c, &r, line, len);
		} else {
			struct sbuf res = {0};
			int rc = c->fn(&r, &res, &e);
			agent_reply(r.id, rc, &res, &e, c->name);
			sb_free(&res);
		}
	}
	jobj_free(&r.obj);
}

/* Host input arrives in arbitrary chunks; complete lines are handled, an
 * over-long line is answered once and skipped up to its newline. */
static char *g_inbuf;
static size_t g_inlen;
static bool g_discarding;
static bool g_input_eof;

static bool requests_in_flight(void)
{
	for (int i = 0; i < MAX_PROCS; i++)
		if (g_procs[i].state == P_LIVE && g_procs[i].qlen > 0)
			return true;
	return false;
}

static void process_input(void)
{
	size_t start = 0;
	for (;;) {
		char *nl = memchr(g_inbuf + start, '\n', g_inlen - start);
		if (!nl)
			break;
		size_t len = (size_t)(nl - (g_inbuf + start));
		if (g_discarding)
			g_discarding = false;
		else
			handle_host_line(g_inbuf + start, len);
		start += len + 1;
	}
	memmove(g_inbuf, g_inbuf + start, g_inlen - start);
	g_inlen -= start;
	if (g_inlen == MAX_MSG) {
		if (!g_discarding) {
			struct err e;
			fail(&e, E2BIG, "request line longer than %u bytes", MAX_MSG);
			agent_error(-1, &e);
		}
		g_discarding = true;
		g_inlen = 0;
	}
}

/* Returns false when input should pause for a moment: a virtio port reads
 * EOF (and polls HUP) while the host side is not connected. */
static bool read_input(void)
{
	ssize_t n = read(g_in, g_inbuf + g_inlen, MAX_MSG - g_inlen);
	if (n < 0 && (errno == EINTR || errno == EAGAIN))
		return true;
	if (n <= 0) {
		if (g_stdio)
			g_input_eof = true; /* finish relaying what is in flight, then exit */
		return false;
	}
	g_inlen += (size_t)n;
	process_input();
	return true;
}

static void do_poweroff(void)
{
	g_poweroff_requested = false;
	fprintf(stderr, "agent: powering off\n");
	sync();
	reboot(RB_POWER_OFF);
	fprintf(stderr, "agent: reboot(RB_POWER_OFF): %s\n", strerror(errno));
}

static void agent_loop(void)
{
	struct pollfd pfd[MAX_PROCS + 1];
	int who[MAX_PROCS + 1];
	unsigned gen[MAX_PROCS + 1];
	bool paused = false;
	for (;;) {
		int n = 0;
		if (g_input_eof && !requests_in_flight())
			exit(0);
		if (!paused && !g_input_eof) {
			pfd[n] = (struct pollfd){g_in, POLLIN, 0};
			who[n++] = -1;
		}
		for (int i = 0; i < MAX_PROCS; i++) {
			if (g_procs[i].state == P_LIVE && g_procs[i].fd >= 0) {
				pfd[n] = (struct pollfd){g_procs[i].fd, POLLIN, 0};
				gen[n] = g_procs[i].gen;
				who[n++] = i;
			}
		}
		bool polled_input = n > 0 && who[0] < 0;
		int rc = poll(pfd, (nfds_t)n, paused ? 200 : -1);
		if (rc < 0 && errno != EINTR) {
			fprintf(stderr, "agent: poll: %s\n", strerror(errno));
			sleep(1);
		}
		bool input_ready = polled_input && rc > 0 && pfd[0].revents;
		paused = false;
		reap_children(); /* run helpers, orphans: no zombies */
		/* Workers first: handling input may fork and reshuffle the table. */
		for (int k = 0; rc > 0 && k < n; k++) {
			if (who[k] < 0 || !pfd[k].revents)
				continue;
			struct proc *p = &g_procs[who[k]];
			if (p->state == P_LIVE && p->gen == gen[k] && p->fd == pfd[k].fd)
				on_worker_readable(p);
		}
		if (input_ready)
			paused = !read_input();
		if (g_poweroff_requested)
			do_poweroff();
	}
}

/* ------------------------------------------------------------------------ */

static void usage(int status)
{
	fprintf(status ? stderr : stdout,
		"usage: agent PORT_PATH|- [--device-dir DIR] [--sysfs-dax DIR] [--files-dir DIR] [--allow-poweroff]\n"
		"Answers one JSON request per line on PORT_PATH (or stdin/stdout for '-').\n");
	exit(status);
}

/* Make sure fds 0-2 exist, so no channel or device lands on them. */
static void ensure_std_fds(void)
{
	for (int fd = 0; fd < 3; fd++)
		if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) < 0)
			break;
}

/* The port's device node may show up a moment after /init starts us. */
static int open_port(const char *path)
{
	for (int i = 0;; i++) {
		int fd = open(path, O_RDWR | O_CLOEXEC | O_NOCTTY);
		if (fd >= 0 || (errno != ENOENT && errno != ENXIO) || i == 300)
			return fd;
		if (i == 0)
			fprintf(stderr, "agent: waiting for %s\n", path);
		usleep(100 * 1000);
	}
}

int main(int argc, char **argv)
{
	const char *port = NULL;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (strcmp(a, "--device-dir") == 0 && i + 1 < argc)
			g_device_dir = argv[++i];
		else if (strcmp(a, "--sysfs-dax") == 0 && i + 1 < argc)
			g_sysfs_dax = argv[++i];
		else if (strcmp(a, "--files-dir") == 0 && i + 1 < argc)
			g_files_dir = argv[++i];
		else if (strcmp(a, "--allow-poweroff") == 0)
			g_allow_poweroff = true;
		else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0)
			usage(0);
		else if ((a[0] == '-' && a[1]) || port)
			usage(2);
		else
			port = a;
	}
	if (!port)
		usage(2);

	ensure_std_fds();
	g_agent_pid = getpid();
	g_page_size = sysconf(_SC_PAGESIZE);
	signal(SIGPIPE, SIG_IGN);  /* a closed channel is an error code, not death */
	signal(SIGCHLD, SIG_DFL);  /* reaped by the agent, which wants their status */
	prctl(PR_SET_CHILD_SUBREAPER, 1); /* orphaned forked workers come back to us */

	if (strcmp(port, "-") == 0) {
		g_stdio = true;
		g_in = 0;
		g_out = 1;
	} else {
		g_in = g_out = open_port(port);
		if (g_in < 0) {
			fprintf(stderr, "agent: open %s: %s\n", port, strerror(errno));
			return 1;
		}
	}
	g_inbuf = malloc(MAX_MSG + 1);
	g_relay_buf = malloc(MAX_MSG + 1);
	if (!g_inbuf || !g_relay_buf) {
		fprintf(stderr, "agent: out of memory\n");
		return 1;
	}
	fprintf(stderr, "agent: pid %d serving %s\n", (int)g_agent_pid, port);
	agent_loop();
}
