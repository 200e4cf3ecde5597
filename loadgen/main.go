// tenx-loadgen: the open-loop HTTP/1.1 load generator of serving/loadgen.py, in Go.
//
// serving/loadgen.py runs it (`LoadGenerator(engine="native")`) when the load to offer
// is more than its Python engine can send on a small machine: at 11,000 requests a second
// the Python engine needs half a core (about 45 us a request), which the server it
// measures then lacks. This one does the same work for a fraction of that, and nothing
// else: Python draws the send times and encodes the requests before the run and computes
// every figure from what this program records after it.
//
// Input (files Python writes): -requests, whole HTTP/1.1 requests, each a little-endian
// uint32 length and its bytes, sent in turn (request i is requests[i % n]); -times, the
// send times in seconds from the start, little-endian float64, sorted.
//
// The run: -initial-connections keep-alive connections are opened first; then one
// thread runs one epoll loop over non-blocking sockets, waking at each send time
// (epoll_pwait2's nanosecond timeout, or a timerfd before Linux 5.11; 1 us timer slack)
// and handing every due request to an idle connection, to a new one while fewer than
// -max-connections are open, or to a queue the next free connection takes from (its
// latency still counts from its intended time). One request is in flight per connection
// (no pipelining); an answer is read by its Content-Length. After the last send, answers
// are awaited for up to -drain-s.
//
// Output (files in -out): handed.f64 (the scheduler handed the request over), sent.f64
// (its bytes were written), finished.f64 (its answer was read): seconds from the start,
// NaN when it never happened; status.i32 (HTTP status; 0 no answer, -1 failed); marked.u8
// (1: a 2xx answer whose body held -marker-hex's bytes); summary.json (CPU seconds and
// wall time of the run, the most connections open at once, how many requests waited for
// a connection, the wall-clock time of the start, the niceness the loop's thread ran at,
// and up to five distinct error messages with their counts).
//
// -nice: the loop's thread runs at least this nice (Linux nice is per thread; the Go
// runtime's other threads, which do next to nothing here, keep theirs). A generator
// sharing a small machine with the server it measures stands in for clients on other
// machines: at nice 10 the server's threads get the cores first, and whatever lateness
// that costs the generator is in its own records (handed vs intended), where the
// caller judges it.
package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

const (
	failed          = -1 // status of a request whose connection failed
	maxErrorSamples = 5  // distinct error messages kept
	readBuffer      = 64 << 10
	maxEvents       = 256
	sysEpollPwait2  = 441 // Linux 5.11+: epoll_wait with a nanosecond timeout
)

type options struct {
	host, port         string
	requestsPath       string
	timesPath          string
	outDir             string
	maxConnections     int
	initialConnections int
	drain              float64 // seconds
	marker             []byte
	startDelay         float64 // seconds
	connectTimeout     float64 // seconds
	nice               int
}

// conn is one keep-alive connection: a non-blocking socket with at most one request
// in flight.
type conn struct {
	fd         int
	buf        []byte
	filled     int
	current    int    // the request in flight; -1: none
	out        []byte // its bytes not yet written
	connecting bool
	connectBy  float64 // when a connect still under way has failed
	watching   uint32  // the epoll events registered
}

// engine is one run: everything happens on one OS thread, in one epoll loop.
type engine struct {
	opts     options
	requests [][]byte
	times    []float64
	start    time.Time
	addr     syscall.Sockaddr
	family   int
	epfd     int
	timerfd  int // used only where epoll_pwait2 is missing
	pwait2   bool

	handed, sent, finished []float64
	status                 []int32
	marked                 []uint8

	conns       map[int]*conn // by fd
	idle        []*conn
	waiting     []int // a FIFO: waiting[head:] are queued
	head        int
	open        int // connected
	opening     int // connecting
	mostOpen    int
	waited      int
	outstanding int
	errs        map[string]int
}

func (e *engine) now() float64 { return time.Since(e.start).Seconds() }

func (e *engine) payload(index int) []byte { return e.requests[index%len(e.requests)] }

// noteError keeps up to maxErrorSamples distinct messages with their counts.
func (e *engine) noteError(message string) {
	if _, seen := e.errs[message]; seen || len(e.errs) < maxErrorSamples {
		e.errs[message]++
	}
}

func (e *engine) watch(c *conn, events uint32) error {
	if c.watching == events {
		return nil
	}
	op := syscall.EPOLL_CTL_MOD
	if c.watching == 0 {
		op = syscall.EPOLL_CTL_ADD
	}
	c.watching = events
	return syscall.EpollCtl(e.epfd, op, c.fd, &syscall.EpollEvent{Events: events, Fd: int32(c.fd)})
}

// dial starts a connection for `index` (-1: none yet); the request is sent once it is up.
func (e *engine) dial(index int) error {
	fd, err := syscall.Socket(e.family, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("socket: %w", err)
	}
	_ = syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1)
	c := &conn{fd: fd, buf: make([]byte, readBuffer), current: index, connecting: true,
		connectBy: e.now() + e.opts.connectTimeout}
	if err := syscall.Connect(fd, e.addr); err != nil && err != syscall.EINPROGRESS {
		_ = syscall.Close(fd)
		return err
	}
	if err := e.watch(c, syscall.EPOLLIN|syscall.EPOLLOUT); err != nil {
		_ = syscall.Close(fd)
		return fmt.Errorf("epoll_ctl: %w", err)
	}
	e.conns[fd] = c
	e.opening++
	return nil
}

// openFor opens a connection for a request that found none idle.
func (e *engine) openFor(index int) {
	if err := e.dial(index); err != nil {
		e.fail(index, "connect: "+err.Error())
	}
}

func (e *engine) fail(index int, message string) {
	e.status[index] = failed
	e.outstanding--
	e.noteError(message)
}

// connected finishes a connect: the socket is writable.
func (e *engine) connected(c *conn) {
	errno, err := syscall.GetsockoptInt(c.fd, syscall.SOL_SOCKET, syscall.SO_ERROR)
	if err == nil && errno != 0 {
		err = syscall.Errno(errno)
	}
	c.connecting = false
	e.opening--
	if err != nil {
		index := c.current
		c.current = -1
		e.drop(c)
		if index >= 0 {
			e.fail(index, "connect: "+err.Error())
		} else {
			e.noteError("connect: " + err.Error())
		}
		return
	}
	e.open++
	if e.open > e.mostOpen {
		e.mostOpen = e.open
	}
	if c.current >= 0 {
		e.sent[c.current] = e.now()
		e.send(c, c.current)
	} else {
		_ = e.watch(c, syscall.EPOLLIN)
		e.idle = append(e.idle, c)
	}
}

// send writes request `index` on the connection (what does not fit now, when it is
// writable again).
func (e *engine) send(c *conn, index int) {
	c.current = index
	c.out = e.payload(index)
	e.flush(c)
}

func (e *engine) flush(c *conn) {
	for len(c.out) > 0 {
		n, err := syscall.Write(c.fd, c.out)
		if err == syscall.EINTR {
			continue
		}
		if err == syscall.EAGAIN {
			_ = e.watch(c, syscall.EPOLLIN|syscall.EPOLLOUT)
			return
		}
		if err != nil {
			e.broken(c, "write: "+err.Error())
			return
		}
		c.out = c.out[n:]
	}
	_ = e.watch(c, syscall.EPOLLIN)
}

// drop closes a connection and forgets it.
func (e *engine) drop(c *conn) {
	_ = syscall.Close(c.fd) // closing removes it from the epoll set
	delete(e.conns, c.fd)
	for i, idle := range e.idle {
		if idle == c {
			e.idle = append(e.idle[:i], e.idle[i+1:]...)
			break
		}
	}
	c.fd = -1
}

// closed takes a connection out of service; its place goes to the oldest waiting
// request, on a new connection.
func (e *engine) closed(c *conn) {
	e.drop(c)
	e.open--
	if e.head < len(e.waiting) && e.open+e.opening < e.opts.maxConnections {
		next := e.waiting[e.head]
		e.head++
		e.openFor(next)
	}
}

// broken ends a connection on an error: the request in flight failed.
func (e *engine) broken(c *conn, message string) {
	if c.current >= 0 {
		e.fail(c.current, message)
		c.current = -1
	} else {
		e.noteError(message)
	}
	e.closed(c)
}

// readable reads what arrived and, once a whole answer is in, records it.
func (e *engine) readable(c *conn) {
	if c.filled == len(c.buf) {
		grown := make([]byte, 2*len(c.buf))
		copy(grown, c.buf[:c.filled])
		c.buf = grown
	}
	n, err := syscall.Read(c.fd, c.buf[c.filled:])
	if err == syscall.EAGAIN || err == syscall.EINTR {
		return
	}
	if err != nil {
		if c.current < 0 {
			e.closed(c) // an idle connection broke: no request lost
			return
		}
		e.broken(c, fmt.Sprintf("connection lost before the answer (%v)", err))
		return
	}
	if n == 0 {
		if c.current < 0 {
			e.closed(c) // the server closed an idle connection: nothing lost
			return
		}
		e.broken(c, "connection lost before the answer (closed by the server)")
		return
	}
	c.filled += n
	end := bytes.Index(c.buf[:c.filled], []byte("\r\n\r\n"))
	if end < 0 {
		return
	}
	status, length, closes, perr := parseHead(c.buf[:end])
	if perr != nil {
		e.broken(c, perr.Error())
		return
	}
	need := end + 4 + length
	if c.filled < need {
		return
	}
	if c.current < 0 {
		e.broken(c, fmt.Sprintf("an answer (%d) to no request", status))
		return
	}
	index := c.current
	at := e.now()
	e.finished[index] = at
	e.status[index] = int32(status)
	if len(e.opts.marker) > 0 && status >= 200 && status < 300 &&
		bytes.Contains(c.buf[end+4:need], e.opts.marker) {
		e.marked[index] = 1
	}
	e.outstanding--
	c.current = -1
	switch {
	case c.filled > need:
		// Bytes of no request's after the answer: it is answered, the connection is not
		// to be trusted with another.
		e.noteError(fmt.Sprintf("an answer (%d) followed by %d bytes of no request's", status, c.filled-need))
		e.closed(c)
		return
	case len(c.out) > 0:
		// Answered before the request was all written (the server did not read the
		// rest): what it reads next would be the rest, not a new request.
		e.closed(c)
		return
	case closes:
		e.closed(c) // it said so: its next write would fail
		return
	}
	c.filled = 0
	if e.head < len(e.waiting) {
		next := e.waiting[e.head]
		e.head++
		e.sent[next] = at
		e.send(c, next)
		return
	}
	e.idle = append(e.idle, c)
}

// hand gives request `index` out: it is due now.
func (e *engine) hand(index int, at float64) {
	e.handed[index] = at
	e.outstanding++
	switch {
	case len(e.idle) > 0:
		c := e.idle[len(e.idle)-1]
		e.idle = e.idle[:len(e.idle)-1]
		e.sent[index] = at
		e.send(c, index)
	case e.open+e.opening < e.opts.maxConnections:
		e.openFor(index)
	default:
		e.waiting = append(e.waiting, index)
		e.waited++
	}
}

// wait blocks until an event or `timeout` seconds (+Inf: no limit; below 0: 0),
// precise to microseconds: epoll_pwait2, else a timerfd beside the sockets.
func (e *engine) wait(events []syscall.EpollEvent, timeout float64) (int, error) {
	timeout = math.Max(timeout, 0)
	if math.IsInf(timeout, 1) {
		timeout = -1
	}
	if timeout >= 0 && e.pwait2 {
		ts := syscall.NsecToTimespec(int64(timeout * 1e9))
		n, _, errno := syscall.Syscall6(sysEpollPwait2, uintptr(e.epfd), uintptr(unsafe.Pointer(&events[0])),
			uintptr(len(events)), uintptr(unsafe.Pointer(&ts)), 0, 0)
		if errno != 0 {
			return 0, errno
		}
		return int(n), nil
	}
	if timeout >= 0 {
		if err := e.armTimer(timeout); err != nil {
			return 0, err
		}
	}
	return syscall.EpollWait(e.epfd, events, -1)
}

// itimerspec is struct itimerspec: no interval, the first expiry `value` from now.
type itimerspec struct{ interval, value syscall.Timespec }

func (e *engine) armTimer(seconds float64) error {
	ns := int64(seconds * 1e9)
	if ns < 1000 {
		ns = 1000 // 0 would disarm it
	}
	spec := itimerspec{value: syscall.NsecToTimespec(ns)}
	_, _, errno := syscall.Syscall6(syscall.SYS_TIMERFD_SETTIME, uintptr(e.timerfd), 0,
		uintptr(unsafe.Pointer(&spec)), 0, 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// setup opens the epoll set (and learns whether epoll_pwait2 is there).
func (e *engine) setup() error {
	var err error
	if e.epfd, err = syscall.EpollCreate1(syscall.EPOLL_CLOEXEC); err != nil {
		return fmt.Errorf("epoll_create1: %w", err)
	}
	probe := make([]syscall.EpollEvent, 1)
	zero := syscall.Timespec{}
	_, _, errno := syscall.Syscall6(sysEpollPwait2, uintptr(e.epfd), uintptr(unsafe.Pointer(&probe[0])), 1,
		uintptr(unsafe.Pointer(&zero)), 0, 0)
	e.pwait2 = errno == 0
	if !e.pwait2 {
		fd, _, errno := syscall.Syscall(syscall.SYS_TIMERFD_CREATE, 1 /* CLOCK_MONOTONIC */, syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
		if errno != 0 {
			return fmt.Errorf("timerfd_create: %w", errno)
		}
		e.timerfd = int(fd)
		event := syscall.EpollEvent{Events: syscall.EPOLLIN, Fd: int32(e.timerfd)}
		if err := syscall.EpollCtl(e.epfd, syscall.EPOLL_CTL_ADD, e.timerfd, &event); err != nil {
			return fmt.Errorf("epoll_ctl timerfd: %w", err)
		}
	}
	return nil
}

// dispatch handles the events one wait returned.
func (e *engine) dispatch(events []syscall.EpollEvent) {
	for _, event := range events {
		fd := int(event.Fd)
		if !e.pwait2 && fd == e.timerfd {
			var expirations [8]byte
			_, _ = syscall.Read(e.timerfd, expirations[:])
			continue
		}
		c := e.conns[fd]
		if c == nil {
			continue // closed by an earlier event of this batch
		}
		if c.connecting {
			if event.Events&(syscall.EPOLLOUT|syscall.EPOLLERR|syscall.EPOLLHUP) != 0 {
				e.connected(c)
			}
			continue
		}
		if event.Events&syscall.EPOLLOUT != 0 && len(c.out) > 0 {
			e.flush(c)
			if c.fd < 0 {
				continue
			}
		}
		if event.Events&(syscall.EPOLLIN|syscall.EPOLLERR|syscall.EPOLLHUP) != 0 {
			e.readable(c)
		}
	}
}

// expireConnects fails the connects that took longer than -connect-timeout-s.
func (e *engine) expireConnects(now float64) (soonest float64) {
	soonest = math.Inf(1)
	if e.opening == 0 {
		return soonest
	}
	for _, c := range e.conns {
		if !c.connecting {
			continue
		}
		if now >= c.connectBy {
			index := c.current
			c.current = -1
			e.drop(c)
			e.opening--
			message := fmt.Sprintf("connect: timed out after %g s", e.opts.connectTimeout)
			if index >= 0 {
				e.fail(index, message)
			} else {
				e.noteError(message)
			}
			continue
		}
		soonest = math.Min(soonest, c.connectBy)
	}
	return soonest
}

// connectFirst opens -initial-connections before the start; any failure ends the run.
func (e *engine) connectFirst() error {
	for i := 0; i < e.opts.initialConnections; i++ {
		if err := e.dial(-1); err != nil {
			return err
		}
	}
	events := make([]syscall.EpollEvent, maxEvents)
	for e.opening > 0 {
		soonest := e.expireConnects(e.now())
		if len(e.errs) > 0 {
			break
		}
		n, err := e.wait(events, soonest-e.now())
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("epoll_wait: %w", err)
		}
		e.dispatch(events[:n])
		if len(e.errs) > 0 {
			break
		}
	}
	for message := range e.errs {
		return errors.New(strings.TrimPrefix(message, "connect: "))
	}
	return nil
}

// run sends every request at its time and awaits the answers until the drain ends.
func (e *engine) run() error {
	events := make([]syscall.EpollEvent, maxEvents)
	count := len(e.times)
	last := 0.0
	if count > 0 {
		last = e.times[count-1]
	}
	next := 0
	for {
		now := e.now()
		for next < count && e.times[next] <= now {
			e.hand(next, now)
			next++
			now = e.now()
		}
		soonest := e.expireConnects(now)
		var until float64
		if next < count {
			until = e.times[next]
		} else {
			if e.outstanding == 0 || now >= last+e.opts.drain {
				return nil
			}
			until = last + e.opts.drain
		}
		until = math.Min(until, soonest)
		n, err := e.wait(events, math.Max(until-now, 0))
		if err == syscall.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("epoll_wait: %w", err)
		}
		e.dispatch(events[:n])
	}
}

func cpuSeconds() float64 {
	var usage syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &usage); err != nil {
		return math.NaN()
	}
	return float64(usage.Utime.Nano()+usage.Stime.Nano()) / 1e9
}

func readRequests(path string) ([][]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var requests [][]byte
	for at := 0; at < len(data); {
		if at+4 > len(data) {
			return nil, fmt.Errorf("%s: truncated length at byte %d", path, at)
		}
		n := int(binary.LittleEndian.Uint32(data[at:]))
		at += 4
		if at+n > len(data) {
			return nil, fmt.Errorf("%s: request %d claims %d bytes, %d left", path, len(requests), n, len(data)-at)
		}
		requests = append(requests, data[at:at+n])
		at += n
	}
	if len(requests) == 0 {
		return nil, fmt.Errorf("%s: no requests", path)
	}
	return requests, nil
}

func readTimes(path string) ([]float64, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(data)%8 != 0 {
		return nil, fmt.Errorf("%s: %d bytes is not a whole number of float64s", path, len(data))
	}
	times := make([]float64, len(data)/8)
	for i := range times {
		times[i] = math.Float64frombits(binary.LittleEndian.Uint64(data[8*i:]))
		if math.IsNaN(times[i]) || math.IsInf(times[i], 0) || times[i] < 0 || (i > 0 && times[i] < times[i-1]) {
			return nil, fmt.Errorf("%s: send times must be sorted finite numbers from 0 (index %d)", path, i)
		}
	}
	return times, nil
}

func writeArray(dir, name string, data any) error {
	f, err := os.Create(filepath.Join(dir, name))
	if err != nil {
		return err
	}
	w := bufio.NewWriter(f)
	if err := binary.Write(w, binary.LittleEndian, data); err != nil {
		_ = f.Close()
		return err
	}
	if err := w.Flush(); err != nil {
		_ = f.Close()
		return err
	}
	return f.Close()
}

func nans(n int) []float64 {
	values := make([]float64, n)
	for i := range values {
		values[i] = math.NaN()
	}
	return values
}

func main() {
	var o options
	var marker string
	flag.StringVar(&o.host, "host", "127.0.0.1", "the server's host")
	flag.StringVar(&o.port, "port", "", "the server's port")
	flag.StringVar(&o.requestsPath, "requests", "", "file of requests: little-endian uint32 length + bytes, each")
	flag.StringVar(&o.timesPath, "times", "", "file of send times: little-endian float64 seconds from the start, sorted")
	flag.StringVar(&o.outDir, "out", "", "folder the results are written to")
	flag.IntVar(&o.maxConnections, "max-connections", 256, "most connections open at once")
	flag.IntVar(&o.initialConnections, "initial-connections", 4, "connections opened before the start")
	flag.Float64Var(&o.drain, "drain-s", 5, "seconds answers are awaited after the last send")
	flag.Float64Var(&o.startDelay, "start-delay-s", 0.01, "seconds from the end of setup to the first send time")
	flag.Float64Var(&o.connectTimeout, "connect-timeout-s", 5, "timeout of each connect")
	flag.StringVar(&marker, "marker-hex", "", "hex of the bytes counted in 2xx answer bodies; empty: not looked for")
	flag.IntVar(&o.nice, "nice", 0, "the least niceness of the thread that runs the load, 0 to 19 (a nicer one stays so)")
	flag.Parse()
	fail := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "tenx-loadgen: "+format+"\n", args...)
		os.Exit(2)
	}
	if o.port == "" || o.requestsPath == "" || o.timesPath == "" || o.outDir == "" {
		fail("-port, -requests, -times and -out are required (see -help)")
	}
	if o.initialConnections < 1 || o.initialConnections > o.maxConnections {
		fail("need 1 <= -initial-connections <= -max-connections, got %d and %d", o.initialConnections, o.maxConnections)
	}
	if o.nice < 0 || o.nice > 19 {
		fail("-nice must be 0 to 19, got %d", o.nice)
	}
	if !(o.drain >= 0) || !(o.startDelay >= 0) || !(o.connectTimeout > 0) {
		fail("-drain-s and -start-delay-s must be 0 or more, -connect-timeout-s more than 0")
	}
	var err error
	if o.marker, err = hex.DecodeString(marker); err != nil {
		fail("-marker-hex: %v", err)
	}
	requests, err := readRequests(o.requestsPath)
	if err != nil {
		fail("%v", err)
	}
	times, err := readTimes(o.timesPath)
	if err != nil {
		fail("%v", err)
	}
	where := net.JoinHostPort(o.host, o.port)
	resolved, err := net.ResolveTCPAddr("tcp", where)
	if err != nil {
		fail("resolve %s: %v", where, err)
	}
	n := len(times)
	e := &engine{
		opts: o, requests: requests, times: times,
		handed: nans(n), sent: nans(n), finished: nans(n),
		status: make([]int32, n), marked: make([]uint8, n),
		conns: map[int]*conn{}, errs: map[string]int{},
	}
	if ip4 := resolved.IP.To4(); ip4 != nil {
		addr := &syscall.SockaddrInet4{Port: resolved.Port}
		copy(addr.Addr[:], ip4)
		e.addr, e.family = addr, syscall.AF_INET
	} else {
		addr := &syscall.SockaddrInet6{Port: resolved.Port}
		copy(addr.Addr[:], resolved.IP.To16())
		e.addr, e.family = addr, syscall.AF_INET6
	}

	// One OS thread does it all; Linux lets its sleeps overrun by 50 us by default
	// (timer slack): 1 us here (PR_SET_TIMERSLACK).
	runtime.LockOSThread()
	_, _, _ = syscall.RawSyscall(syscall.SYS_PRCTL, 29, 1000, 0)
	nice, err := setNice(o.nice)
	if err != nil {
		fail("-nice %d: %v", o.nice, err)
	}
	e.start = time.Now()
	if err := e.setup(); err != nil {
		fail("%v", err)
	}
	if err := e.connectFirst(); err != nil {
		fail("connect to %s: %v", where, err)
	}
	cpuBegan := cpuSeconds()
	e.start = time.Now().Add(time.Duration(o.startDelay * 1e9))
	startedEpoch := float64(e.start.UnixNano()) / 1e9
	if err := e.run(); err != nil {
		fail("%v", err)
	}
	wall := e.now()
	cpu := cpuSeconds() - cpuBegan

	if err := os.MkdirAll(o.outDir, 0o755); err != nil {
		fail("%v", err)
	}
	for name, data := range map[string]any{
		"handed.f64": e.handed, "sent.f64": e.sent, "finished.f64": e.finished,
		"status.i32": e.status, "marked.u8": e.marked,
	} {
		if err := writeArray(o.outDir, name, data); err != nil {
			fail("write %s: %v", name, err)
		}
	}
	summary, _ := json.Marshal(map[string]any{
		"cpu_s": cpu, "wall_s": wall, "most_open": e.mostOpen, "waited": e.waited,
		"started_epoch_s": startedEpoch, "errors": e.errs, "epoll_pwait2": e.pwait2, "nice": nice,
	})
	if err := os.WriteFile(filepath.Join(o.outDir, "summary.json"), summary, 0o644); err != nil {
		fail("write summary.json: %v", err)
	}
}

// setNice raises the niceness of the calling thread (locked to its goroutine) to n
// where it is below that (lowering it takes privileges; a generator started nicer stays
// so), and returns the niceness it has then, as the kernel reads it back.
func setNice(n int) (int, error) {
	tid := syscall.Gettid()
	current, err := niceOf(tid)
	if err != nil || n <= current {
		return current, err
	}
	if err := syscall.Setpriority(syscall.PRIO_PROCESS, tid, n); err != nil {
		return 0, err
	}
	return niceOf(tid)
}

func niceOf(tid int) (int, error) {
	// The raw getpriority system call answers 20 - nice (never negative).
	raw, _, errno := syscall.RawSyscall(syscall.SYS_GETPRIORITY, syscall.PRIO_PROCESS, uintptr(tid), 0)
	if errno != 0 {
		return 0, errno
	}
	return 20 - int(raw), nil
}

// parseHead reads a response head: its status, Content-Length and whether it closes
// the connection.
func parseHead(head []byte) (status, length int, closes bool, err error) {
	if len(head) < 12 || !bytes.HasPrefix(head, []byte("HTTP/1.")) {
		return 0, 0, false, fmt.Errorf("malformed response head: %q", clip(head))
	}
	status, err = strconv.Atoi(string(head[9:12]))
	if err != nil {
		return 0, 0, false, fmt.Errorf("malformed response head: %q", clip(head))
	}
	length = -1
	for rest := head; ; {
		at := bytes.Index(rest, []byte("\r\n"))
		if at < 0 {
			break
		}
		rest = rest[at+2:]
		line := rest
		if next := bytes.Index(rest, []byte("\r\n")); next >= 0 {
			line = rest[:next]
		}
		colon := bytes.IndexByte(line, ':')
		if colon < 0 {
			continue
		}
		name, value := bytes.TrimSpace(line[:colon]), bytes.TrimSpace(line[colon+1:])
		switch {
		case bytes.EqualFold(name, []byte("content-length")):
			length, err = strconv.Atoi(string(value))
			if err != nil || length < 0 {
				return 0, 0, false, fmt.Errorf("malformed Content-Length: %q", clip(line))
			}
		case bytes.EqualFold(name, []byte("connection")):
			closes = bytes.EqualFold(value, []byte("close"))
		}
	}
	if length < 0 {
		return 0, 0, false, fmt.Errorf("malformed or unsupported response (no Content-Length): %q", clip(head))
	}
	return status, length, closes, nil
}

func clip(b []byte) []byte {
	if len(b) > 80 {
		return b[:80]
	}
	return b
}
