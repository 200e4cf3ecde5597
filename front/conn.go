package main

// One client connection, served in order: read a request's head, judge it, and either
// answer 503 (its body read and dropped) or forward it, head and body as they came, on
// this connection's own connection to the server, then relay the answer with the gate
// taken out. No goroutine hand-offs and no copies beyond the two buffers: Go's
// httputil.ReverseProxy cost about 150 us of CPU per forwarded request here (net/http
// server, transport read and write loops, a background read per request), as much as
// the Python server spends serving it.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
	"time"
)

type limits struct {
	header   time.Duration // a request's head must arrive within this once its first byte has
	idle     time.Duration // an idle client connection is closed after this
	body     time.Duration // each read of a request body, each write of an answer
	upstream time.Duration // the server's answer must start within this
	upIdle   time.Duration // a connection to the server idle this long is not reused
	maxHead  int           // bytes of a request head
}

type proxy struct {
	gate     *gate
	upstream string
	secret   string
	auth     []byte // "Bearer <token>", or nil when the server takes no token
	limits   limits
	failures *rateLog
}

// request is a parsed request head; lines keep the head's bytes for forwarding.
type request struct {
	method, target, proto string
	lines                 [][]byte // header lines, without their line ends
	contentLength         int64    // -1: none given
	chunked               bool
	closeAfter            bool // Connection: close, or HTTP/1.0 without keep-alive
	expectContinue        bool
	priority, tenant      string
	tenantGiven           bool
	authorization         string
	requestID             string
}

var errHeadTooLarge = errors.New("request head too large")

type badRequest struct{ why string }

func (b badRequest) Error() string { return b.why }

func (p *proxy) serve(conn net.Conn) {
	defer conn.Close()
	client := &timedConn{Conn: conn, write: p.limits.body}
	in := bufio.NewReaderSize(client, 16<<10)
	out := bufio.NewWriterSize(client, 16<<10)
	defer out.Flush() // however the loop ends, the answers made go out
	up := &upstreamConn{addr: p.upstream, idle: p.limits.upIdle, write: p.limits.body}
	defer up.close()
	for {
		if !headBuffered(in) { // the next read may wait: the answers made so far go out first
			if out.Flush() != nil {
				return
			}
		}
		if in.Buffered() == 0 {
			client.readWithin(p.limits.idle)
			if _, err := in.Peek(1); err != nil {
				return // closed, or idle past the keep-alive
			}
		}
		client.readWithin(p.limits.header)
		req, err := readRequest(in, p.limits.maxHead)
		if err != nil {
			var bad badRequest
			switch {
			case errors.Is(err, errHeadTooLarge):
				p.answer(out, 431, "", fmt.Sprintf(`{"error":"request head over %d bytes"}`, p.limits.maxHead), true)
			case errors.As(err, &bad):
				p.answer(out, 400, "", fmt.Sprintf(`{"error":%s}`, strconv.Quote(bad.why)), true)
			}
			return
		}
		client.eachRead(p.limits.body) // its body, if any
		if !p.handle(req, in, out, up) {
			return
		}
	}
}

// headBuffered: a whole request head is already read, so reading it cannot wait.
func headBuffered(in *bufio.Reader) bool {
	buffered, _ := in.Peek(in.Buffered())
	return bytes.Contains(buffered, []byte("\r\n\r\n"))
}

// handle answers one request; false when the client connection must close after it.
func (p *proxy) handle(req *request, in *bufio.Reader, out *bufio.Writer, up *upstreamConn) bool {
	path := req.target
	if i := strings.IndexByte(path, '?'); i >= 0 {
		path = path[:i]
	}
	predict := path == "/predict" && req.method == "POST"
	authorized := p.auth == nil || constantTimeEqual(req.authorization, p.auth)
	passed := false
	if predict && req.proto == "HTTP/1.1" && authorized && !req.expectContinue {
		class := strings.ToLower(strings.TrimSpace(req.priority))
		if (class == "default" || class == "sheddable") && len(req.tenant) <= maxTenantLen {
			tenant := req.tenant
			if !req.tenantGiven { // as the server: no header is "default", an empty one is ""
				tenant = "default"
			}
			var refusal string
			refusal, passed = p.gate.judge(class, tenant)
			if refusal != "" {
				if err := copyBody(io.Discard, in, req, false); err != nil {
					return false
				}
				body := fmt.Sprintf(`{"error":%s,"reason":"overload"}`, strconv.Quote(refusal))
				extra := "X-Request-Id: " + requestID(req.requestID) + "\r\nRetry-After: 1\r\n"
				return p.answer(out, 503, extra, body, req.closeAfter)
			}
		}
	}
	report := ""
	scrape := path == "/metrics" && (req.method == "GET" || req.method == "HEAD") // the server reads it on these only
	if (predict && authorized) || scrape {
		report = p.gate.report()
	}
	return p.forward(req, in, out, up, passed, report)
}

// maxReplay: a request body up to this size is read whole before it is sent, so that it
// can be sent again when the kept connection to the server turns out to be closed.
const maxReplay = 64 << 10

func (p *proxy) forward(req *request, in *bufio.Reader, out *bufio.Writer, up *upstreamConn, passed bool,
	report string) bool {
	if req.expectContinue { // the front reads the body, so it says continue itself
		_, _ = out.WriteString("HTTP/1.1 100 Continue\r\n\r\n")
		if out.Flush() != nil {
			p.gate.giveBack(report)
			return false
		}
	}
	head := p.forwardedHead(req, passed, report)
	whole := !req.chunked && req.contentLength <= maxReplay
	var body []byte
	if whole && req.contentLength > 0 {
		body = make([]byte, req.contentLength)
		if _, err := io.ReadFull(in, body); err != nil {
			p.gate.giveBack(report) // the request never reached the server
			return false
		}
	}
	if out.Flush() != nil { // earlier pipelined answers do not wait for this one
		p.gate.giveBack(report)
		return false
	}
	for attempt := 0; ; attempt++ {
		reused, err := up.get()
		if err != nil {
			p.gate.giveBack(report)
			p.failures.note(fmt.Sprintf("%s %s: the model server did not answer: %v", req.method, req.target, err))
			return p.unavailable(out, 502)
		}
		_, _ = up.out.Write(head)
		if whole {
			_, _ = up.out.Write(body)
		} else if err = copyBody(up.out, in, req, false); err != nil {
			up.close()
			p.gate.giveBack(report) // an incomplete request: the server drops it unread
			var bad badRequest
			if errors.As(err, &bad) {
				p.answer(out, 400, "", fmt.Sprintf(`{"error":%s}`, strconv.Quote(bad.why)), true)
			}
			return false // the client's body broke off: nothing more can be read from it in order
		}
		if err == nil {
			err = up.out.Flush()
		}
		if err == nil {
			up.timed.readWithin(p.limits.upstream)
			var keep bool
			if keep, err = p.relay(req, out, up); err == nil {
				up.used()
				return keep && !req.closeAfter
			}
			if !errors.Is(err, errNothingRelayed) {
				up.close()
				return false // part of the answer went out: the client sees it cut off
			}
		}
		up.close()
		if stale(err) && reused {
			if whole && attempt == 0 {
				continue // the kept connection was closed under it: once more, on a new one
			}
			p.gate.giveBack(report) // the server closed it unread
		}
		p.failures.note(fmt.Sprintf("%s %s: the model server did not answer: %v", req.method, req.target, err))
		status := 502
		var timeout net.Error
		if errors.As(err, &timeout) && timeout.Timeout() {
			status = 504
		}
		return p.unavailable(out, status)
	}
}

// stale: what sending on a connection the server had closed looks like.
func stale(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.EPIPE)
}

// forwardedHead is the request head as the server gets it: the client's X-Tenx-*
// headers dropped (and Expect, which the front answered), the front's own added.
func (p *proxy) forwardedHead(req *request, passed bool, report string) []byte {
	var b bytes.Buffer
	b.WriteString(req.method + " " + req.target + " " + req.proto + "\r\n")
	for _, line := range req.lines {
		if isFrontHeader(line) || (req.expectContinue && hasName(line, "expect")) {
			continue
		}
		b.Write(line)
		b.WriteString("\r\n")
	}
	b.WriteString(secretHeader + ": " + p.secret + "\r\n")
	if passed {
		b.WriteString(passedHeader + ": 1\r\n")
	}
	if report != "" {
		b.WriteString(shedHeader + ": " + report + "\r\n")
	}
	b.WriteString("\r\n")
	return b.Bytes()
}

var errNothingRelayed = errors.New("no answer")

type relayError struct{ err error }

func (e relayError) Error() string { return e.err.Error() }
func (e relayError) Unwrap() []error {
	return []error{errNothingRelayed, e.err}
}

// relay copies the server's answer (interim ones first) to the client, the gate taken
// out of its head; keep is false when either side closes after it.
func (p *proxy) relay(req *request, out *bufio.Writer, up *upstreamConn) (keep bool, err error) {
	for {
		status, lines, err := readResponseHead(up.in)
		if err != nil {
			return false, relayError{err}
		}
		up.timed.eachRead(p.limits.body) // the rest of it keeps coming, or is given up
		length, chunked, closeAfter := int64(-1), false, false
		for _, line := range lines {
			name, value := splitHeader(line)
			switch {
			case strings.EqualFold(name, gateHeader):
				p.gate.update(value)
				continue
			case strings.EqualFold(name, "content-length"):
				length, _ = strconv.ParseInt(strings.TrimSpace(value), 10, 64)
			case strings.EqualFold(name, "transfer-encoding"):
				chunked = strings.Contains(strings.ToLower(value), "chunked")
			case strings.EqualFold(name, "connection"):
				closeAfter = hasToken(value, "close")
			}
			_, _ = out.Write(line)
			_, _ = out.WriteString("\r\n")
		}
		_, _ = out.WriteString("\r\n")
		if status >= 100 && status < 200 && status != 101 {
			up.timed.readWithin(p.limits.upstream)
			continue // an interim answer: the final one follows
		}
		if status == 101 {
			return false, nil // no upgrades through the front: the model server offers none
		}
		framing := &request{contentLength: length, chunked: chunked}
		switch {
		case req.method == "HEAD" || status == 204 || status == 304:
		case chunked || length >= 0:
			if err := copyBody(out, up.in, framing, true); err != nil {
				return false, err
			}
		default: // the answer runs to the connection's end
			if _, err := io.Copy(out, up.in); err != nil {
				return false, err
			}
			up.close()
			return false, nil
		}
		if closeAfter {
			up.close()
		}
		return !closeAfter, nil
	}
}

func (p *proxy) unavailable(out *bufio.Writer, status int) bool {
	body := `{"error":"the model server behind tenx-front did not answer; retry later"}`
	return p.answer(out, status, "Retry-After: 1\r\n", body, true)
}

// answer writes a JSON answer of the front's own (it goes out with the next flush);
// returns whether the connection stays open.
func (p *proxy) answer(out *bufio.Writer, status int, extra, body string, closeAfter bool) bool {
	fmt.Fprintf(out, "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s",
		status, statusText(status), len(body), extra)
	if closeAfter {
		_, _ = out.WriteString("Connection: close\r\n")
	}
	_, _ = out.WriteString("\r\n")
	_, _ = out.WriteString(body)
	return !closeAfter
}

func statusText(status int) string {
	switch status {
	case 400:
		return "Bad Request"
	case 431:
		return "Request Header Fields Too Large"
	case 502:
		return "Bad Gateway"
	case 503:
		return "Service Unavailable"
	case 504:
		return "Gateway Timeout"
	}
	return "Error"
}

// readRequest reads and checks one request head.
func readRequest(in *bufio.Reader, maxHead int) (*request, error) {
	size := 0
	first, err := readLine(in, &size, maxHead)
	if err != nil {
		return nil, err
	}
	for len(first) == 0 { // a stray line end between requests is allowed (RFC 9112 2.2)
		if first, err = readLine(in, &size, maxHead); err != nil {
			return nil, err
		}
	}
	parts := strings.Split(string(first), " ")
	if len(parts) != 3 || parts[0] == "" || parts[1] == "" || !strings.HasPrefix(parts[2], "HTTP/1.") {
		return nil, badRequest{"malformed request line"}
	}
	req := &request{method: parts[0], target: parts[1], proto: parts[2], contentLength: -1}
	if req.proto != "HTTP/1.1" && req.proto != "HTTP/1.0" {
		return nil, badRequest{"unsupported HTTP version " + req.proto}
	}
	keepAlive := false
	for {
		line, err := readLine(in, &size, maxHead)
		if err != nil {
			return nil, err
		}
		if len(line) == 0 {
			break
		}
		if line[0] == ' ' || line[0] == '\t' {
			return nil, badRequest{"folded header lines are not accepted"}
		}
		name, value := splitHeader(line)
		if name == "" || strings.ContainsAny(name, " \t") {
			return nil, badRequest{"malformed header line"}
		}
		req.lines = append(req.lines, append([]byte(nil), line...))
		switch lowerName(name) {
		case "content-length":
			n, err := strconv.ParseInt(strings.TrimSpace(value), 10, 64)
			if err != nil || n < 0 || (req.contentLength >= 0 && req.contentLength != n) {
				return nil, badRequest{"bad Content-Length"}
			}
			req.contentLength = n
		case "transfer-encoding":
			codings := strings.Split(strings.ToLower(value), ",")
			if strings.TrimSpace(codings[len(codings)-1]) != "chunked" {
				return nil, badRequest{"unsupported Transfer-Encoding " + value}
			}
			req.chunked = true
		case "connection":
			req.closeAfter = req.closeAfter || hasToken(value, "close")
			keepAlive = hasToken(value, "keep-alive")
		case "expect":
			req.expectContinue = strings.EqualFold(strings.TrimSpace(value), "100-continue")
		case "x-priority":
			req.priority = value
		case "x-tenant":
			req.tenant, req.tenantGiven = value, true
		case "authorization":
			req.authorization = value
		case "x-request-id":
			req.requestID = value
		}
	}
	if req.chunked && req.contentLength >= 0 {
		return nil, badRequest{"both Content-Length and Transfer-Encoding"}
	}
	if req.proto == "HTTP/1.0" && !keepAlive {
		req.closeAfter = true
	}
	return req, nil
}

// readResponseHead reads a status line and header lines.
func readResponseHead(in *bufio.Reader) (int, [][]byte, error) {
	size := 0
	first, err := readLine(in, &size, 1<<20)
	if err != nil {
		return 0, nil, err
	}
	parts := strings.SplitN(string(first), " ", 3)
	if len(parts) < 2 || !strings.HasPrefix(parts[0], "HTTP/1.") {
		return 0, nil, errors.New("malformed status line from the server")
	}
	status, err := strconv.Atoi(parts[1])
	if err != nil {
		return 0, nil, errors.New("malformed status from the server")
	}
	lines := [][]byte{append([]byte(nil), first...)}
	for {
		line, err := readLine(in, &size, 1<<20)
		if err != nil {
			return 0, nil, err
		}
		if len(line) == 0 {
			return status, lines, nil
		}
		lines = append(lines, append([]byte(nil), line...))
	}
}

// readLine returns one line without its line end; the slice is valid until the next read.
func readLine(in *bufio.Reader, size *int, max int) ([]byte, error) {
	line, err := in.ReadSlice('\n')
	if errors.Is(err, bufio.ErrBufferFull) {
		long := append([]byte(nil), line...)
		for errors.Is(err, bufio.ErrBufferFull) {
			if *size+len(long) > max {
				return nil, errHeadTooLarge
			}
			line, err = in.ReadSlice('\n')
			long = append(long, line...)
		}
		line = long
	}
	if err != nil {
		return nil, err
	}
	*size += len(line)
	if *size > max {
		return nil, errHeadTooLarge
	}
	line = bytes.TrimSuffix(line, []byte{'\n'})
	return bytes.TrimSuffix(line, []byte{'\r'}), nil
}

// copyBody copies a message body as it came: Content-Length bytes, or chunks (sizes,
// data and trailers) up to the last one.
func copyBody(dst io.Writer, src *bufio.Reader, req *request, keepTrailers bool) error {
	if !req.chunked {
		if req.contentLength <= 0 {
			return nil
		}
		_, err := io.CopyN(dst, src, req.contentLength)
		return err
	}
	size := 0
	for {
		line, err := readLine(src, &size, 64<<10)
		if err != nil {
			return err
		}
		text := string(line)
		if i := strings.IndexByte(text, ';'); i >= 0 {
			text = text[:i]
		}
		n, err := strconv.ParseInt(strings.TrimSpace(text), 16, 64)
		if err != nil || n < 0 {
			return badRequest{"malformed chunk size"}
		}
		if _, err := fmt.Fprintf(dst, "%s\r\n", line); err != nil {
			return err
		}
		if n == 0 {
			for { // trailers, then the blank line
				trailer, err := readLine(src, &size, 64<<10)
				if err != nil {
					return err
				}
				// A request's trailers are dropped: uvicorn lists them among the
				// headers, where a client's X-Tenx-* trailer would pass for the front's.
				if len(trailer) != 0 && !keepTrailers {
					continue
				}
				if _, err := fmt.Fprintf(dst, "%s\r\n", trailer); err != nil {
					return err
				}
				if len(trailer) == 0 {
					return nil
				}
			}
		}
		if _, err := io.CopyN(dst, src, n); err != nil {
			return err
		}
		end, err := readLine(src, &size, 64<<10)
		if err != nil {
			return err
		}
		if len(end) != 0 {
			return badRequest{"chunk longer than its size"}
		}
		if _, err := io.WriteString(dst, "\r\n"); err != nil {
			return err
		}
		size = 0
	}
}

func splitHeader(line []byte) (string, string) {
	i := bytes.IndexByte(line, ':')
	if i < 0 {
		return "", ""
	}
	return string(line[:i]), strings.TrimSpace(string(line[i+1:]))
}

func hasName(line []byte, lower string) bool {
	name, _ := splitHeader(line)
	return strings.EqualFold(name, lower)
}

// isFrontHeader: a client's X-Tenx-* header, which never reaches the server.
func isFrontHeader(line []byte) bool {
	return len(line) > 7 && strings.EqualFold(string(line[:7]), "x-tenx-")
}

func hasToken(value, token string) bool {
	for _, part := range strings.Split(value, ",") {
		if strings.EqualFold(strings.TrimSpace(part), token) {
			return true
		}
	}
	return false
}

// upstreamConn is one client connection's connection to the server, dialed when first
// needed and not reused once idle past `idle` (the server closes idle ones itself).
type upstreamConn struct {
	addr     string
	idle     time.Duration
	write    time.Duration
	conn     net.Conn
	timed    *timedConn
	in       *bufio.Reader
	out      *bufio.Writer
	lastUsed time.Time
}

// get makes sure there is a connection; reused says it is a kept one, which the server
// may have closed since.
func (u *upstreamConn) get() (reused bool, err error) {
	if u.conn != nil && time.Since(u.lastUsed) > u.idle {
		u.close()
	}
	if u.conn != nil {
		return true, nil
	}
	conn, err := net.DialTimeout("tcp", u.addr, 5*time.Second)
	if err != nil {
		return false, err
	}
	u.conn = conn
	u.timed = &timedConn{Conn: conn, write: u.write}
	u.in = bufio.NewReaderSize(u.timed, 16<<10)
	u.out = bufio.NewWriterSize(u.timed, 16<<10)
	return false, nil
}

func (u *upstreamConn) used() { u.lastUsed = time.Now() }

func (u *upstreamConn) close() {
	if u.conn != nil {
		_ = u.conn.Close()
		u.conn = nil
	}
}

// timedConn gives each Write a deadline of its own, and each Read one while perRead is
// set: one deadline for a whole answer would cut a long one off, and a deadline left
// from an earlier flush may have passed already.
type timedConn struct {
	net.Conn
	write   time.Duration
	perRead time.Duration // 0: the deadline last set by readWithin stands
}

func (c *timedConn) Write(b []byte) (int, error) {
	_ = c.Conn.SetWriteDeadline(time.Now().Add(c.write))
	return c.Conn.Write(b)
}

func (c *timedConn) Read(b []byte) (int, error) {
	if c.perRead > 0 {
		_ = c.Conn.SetReadDeadline(time.Now().Add(c.perRead))
	}
	return c.Conn.Read(b)
}

// readWithin: whatever is read next must arrive within d, however many reads it takes.
func (c *timedConn) readWithin(d time.Duration) {
	c.perRead = 0
	_ = c.Conn.SetReadDeadline(time.Now().Add(d))
}

// eachRead: every read from now on must make progress within d.
func (c *timedConn) eachRead(d time.Duration) { c.perRead = d }

// lowerName is the header name in lower case when it is one the front reads, else "":
// most header names need no copy at all.
func lowerName(name string) string {
	for _, known := range knownNames {
		if len(known) == len(name) && strings.EqualFold(known, name) {
			return known
		}
	}
	return ""
}

var knownNames = [...]string{
	"content-length", "transfer-encoding", "connection", "expect", "x-priority", "x-tenant", "authorization",
	"x-request-id",
}
