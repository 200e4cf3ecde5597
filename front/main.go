// tenx-front: the model server's admission front, in Go.
//
// `tenx serve-models --front` runs it on the public address and the Python server on a
// private loopback port behind it. Under overload most requests are sheddable ones the
// server refuses, and each refusal costs the one Python event loop the admitted critical
// requests need (about 45 us of a served request's 250 us: the read, the header parse
// and the write). This front refuses them from their headers instead, on its own
// threads, and forwards everything else unchanged.
//
// It decides nothing of its own: every answer the Python server gives carries its gate
// (X-Tenx-Gate: the share of sheddable requests it lets through, and whether its queues
// have room for default and sheddable work), and the front applies the newest one. A
// gate older than --stale (the server has answered nothing for a while) decides
// nothing: requests go through and the server's answers bring a fresh one. Only
// requests that name their class in X-Priority, carry the token when one is set, and
// POST to /predict are judged; the server judges every other one itself, as before.
//
// Its refusals are the server's: the same 503 body and Retry-After, and they are
// counted in the server's metrics (tenx_model_shed_total and tenx_model_requests_total):
// the counts ride to it on the next forwarded /predict or /metrics request (header
// X-Tenx-Front-Shed), so a scrape sees every refusal made before it.
//
// The server trusts those headers only with the secret both were started with
// (TENX_FRONT_SECRET); the front drops any X-Tenx-* header a client sends.
package main

import (
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"log"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"os/signal"
	"runtime/pprof"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	gateHeader   = "X-Tenx-Gate"         // server -> front: "<passing> <default open> <sheddable open>"
	secretHeader = "X-Tenx-Front"        // front -> server: the shared secret
	passedHeader = "X-Tenx-Front-Passed" // front -> server: this sheddable request passed the front's share
	shedHeader   = "X-Tenx-Front-Shed"   // front -> server: refusals since the last report
	maxTenants   = 1000                  // distinct tenant labels counted; the rest count as "other"
	maxTenantLen = 256                   // a longer X-Tenant is left to the server, which labels it as it does any
)

// gate is the server's newest admission state, as its last answer gave it.
type gate struct {
	mu        sync.Mutex
	passing   float64 // share of sheddable requests let through
	openDef   bool    // the queues have room for default work
	openShed  bool    // ... and for sheddable work
	seen      time.Time
	credit    float64
	stale     time.Duration
	shedCount map[[2]string]uint64 // (class, tenant) -> refusals not yet reported
	tenants   map[string]bool
}

func (g *gate) update(value string) {
	fields := strings.Fields(value)
	if len(fields) != 3 {
		return
	}
	passing, err := strconv.ParseFloat(fields[0], 64)
	if err != nil || passing < 0 || passing > 1 {
		return
	}
	g.mu.Lock()
	g.passing = passing
	g.openDef = fields[1] == "1"
	g.openShed = fields[2] == "1"
	g.seen = time.Now()
	g.mu.Unlock()
}

// judge returns a refusal message, or "" to forward; passed is true when a sheddable
// request passed the front's share (the server must not draw its share again).
func (g *gate) judge(class, tenant string) (refusal string, passed bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.seen.IsZero() || time.Since(g.seen) > g.stale {
		return "", false // no fresh gate: the server decides, and its answer brings one
	}
	switch class {
	case "default":
		if g.openDef {
			return "", false
		}
	case "sheddable":
		if g.passing < 1 {
			g.credit += g.passing // evenly spaced, as the server's LoopPressure.let_through
			if g.credit < 1 {
				g.count(class, tenant)
				return fmt.Sprintf("overloaded: the server lets %.0f%% of sheddable requests in; retry later", 100*g.passing), false
			}
			g.credit--
		} else {
			g.credit = 0
		}
		if g.openShed {
			return "", true
		}
	default:
		return "", false
	}
	g.count(class, tenant)
	return fmt.Sprintf("overloaded: every model's queue is past the %s mark; retry later", class), false
}

func (g *gate) count(class, tenant string) {
	if !g.tenants[tenant] {
		if len(g.tenants) >= maxTenants {
			tenant = "other"
		}
		g.tenants[tenant] = true
	}
	g.shedCount[[2]string{class, tenant}]++
}

// report takes the refusals not yet reported, as the shed header's value ("" when none):
// space-separated class/tenant/count, the tenant percent-encoded.
func (g *gate) report() string {
	g.mu.Lock()
	if len(g.shedCount) == 0 {
		g.mu.Unlock()
		return ""
	}
	counts := g.shedCount
	g.shedCount = make(map[[2]string]uint64)
	g.mu.Unlock()
	parts := make([]string, 0, len(counts))
	for key, n := range counts {
		parts = append(parts, key[0]+"/"+url.PathEscape(key[1])+"/"+strconv.FormatUint(n, 10))
	}
	sort.Strings(parts)
	return strings.Join(parts, " ")
}

// giveBack puts counts whose request never reached the server back, to go with the next.
func (g *gate) giveBack(value string) {
	if value == "" {
		return
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	for _, part := range strings.Fields(value) {
		bits := strings.Split(part, "/")
		if len(bits) != 3 {
			continue
		}
		tenant, err1 := url.PathUnescape(bits[1])
		n, err2 := strconv.ParseUint(bits[2], 10, 64)
		if err1 == nil && err2 == nil {
			g.shedCount[[2]string{bits[0], tenant}] += n
		}
	}
}

func constantTimeEqual(given string, want []byte) bool {
	return subtle.ConstantTimeCompare([]byte(given), want) == 1
}

// requestID is the server's rule (serving/logs.py new_request_id): the client's id when
// it is up to 64 printable ASCII characters without a space, else a new one.
func requestID(given string) string {
	if given != "" && len(given) <= 64 {
		sane := true
		for i := 0; i < len(given); i++ {
			if c := given[i]; c <= ' ' || c > '~' {
				sane = false
				break
			}
		}
		if sane {
			return given
		}
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], rand.Uint64()) // as the server's: unique enough to trace by, no system call
	return hex.EncodeToString(b[:])
}

func main() {
	listen := flag.String("listen", "127.0.0.1:8081", "address to serve on (host:port)")
	upstream := flag.String("upstream", "", "the Python model server behind this front (host:port)")
	stale := flag.Duration("stale", 200*time.Millisecond, "a gate older than this decides nothing")
	keepAlive := flag.Duration("keep-alive", 75*time.Second,
		"idle client connections are closed after this (nginx's default; an idle connection costs the front a few KiB, "+
			"and each close races a client's next request on it)")
	upstreamIdle := flag.Duration("upstream-idle", 4*time.Second,
		"a connection to the server idle this long is not reused: below the server's own keep-alive (5 s), so the "+
			"front never sends on a connection the server is closing")
	headerTimeout := flag.Duration("header-timeout", 10*time.Second, "a request's head must arrive within this")
	bodyTimeout := flag.Duration("body-timeout", 60*time.Second, "longest wait for each read of a body or write of an answer")
	upstreamTimeout := flag.Duration("upstream-timeout", 610*time.Second,
		"longest wait for the server's answer to start (deadlines go up to 600 s)")
	maxHead := flag.Int("max-head-bytes", 1<<20, "largest request head (431 past it)")
	parent := flag.Int("parent-pid", 0, "exit when this process (the model server that started the front) is gone")
	profile := flag.String("cpu-profile", os.Getenv("TENX_FRONT_CPU_PROFILE"),
		"write a Go CPU profile here until the front stops (go tool pprof -top tenx-front FILE); $TENX_FRONT_CPU_PROFILE")
	flag.Parse()
	log.SetPrefix("tenx-front: ")
	log.SetFlags(0)
	secret := os.Getenv("TENX_FRONT_SECRET")
	if *upstream == "" || secret == "" {
		log.Fatal("needs --upstream HOST:PORT and TENX_FRONT_SECRET (tenx serve-models --front sets both)")
	}
	var auth []byte
	if token := os.Getenv("TENX_API_TOKEN"); token != "" {
		auth = []byte("Bearer " + token)
	}
	p := &proxy{
		gate:     &gate{stale: *stale, shedCount: make(map[[2]string]uint64), tenants: make(map[string]bool)},
		upstream: *upstream,
		secret:   secret,
		auth:     auth,
		limits: limits{header: *headerTimeout, idle: *keepAlive, body: *bodyTimeout, upstream: *upstreamTimeout,
			upIdle: *upstreamIdle, maxHead: *maxHead},
		failures: &rateLog{every: time.Second},
	}
	if *parent > 0 {
		go watchParent(*parent)
	}
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("cannot listen on %s: %v", *listen, err)
	}
	stopProfile := func() {}
	if *profile != "" {
		file, err := os.Create(*profile)
		if err != nil {
			log.Fatalf("--cpu-profile: %v", err)
		}
		if err := pprof.StartCPUProfile(file); err != nil {
			log.Fatalf("--cpu-profile: %v", err)
		}
		stopProfile = func() { pprof.StopCPUProfile(); _ = file.Close() }
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		<-stop
		_ = listener.Close() // serve returns
	}()
	serve(listener, p)
	stopProfile() // here, not in the signal's goroutine: main returning would end the process mid-write
}

func init() {
	// The parent's death ends the front at once (Linux; the main thread runs init, and
	// the signal goes to the thread that asked). watchParent covers the rest.
	_, _, _ = syscall.RawSyscall(syscall.SYS_PRCTL, syscall.PR_SET_PDEATHSIG, uintptr(syscall.SIGTERM), 0)
}

// watchParent ends the front once the model server that started it is gone, however
// it went (killed, crashed): a front left running would answer for a server that is not
// there and hold its port.
func watchParent(pid int) {
	for {
		if os.Getppid() != pid {
			log.Printf("the model server (pid %d) is gone; stopping", pid)
			_ = syscall.Kill(os.Getpid(), syscall.SIGTERM) // the same way out as a stop: the profile is written
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// serve accepts until the listener closes; a failed accept (out of file descriptors,
// say) is logged once a second and retried after a pause instead of ending the front.
func serve(listener net.Listener, p *proxy) {
	accepts := &rateLog{every: time.Second}
	for {
		conn, err := listener.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			accepts.note(fmt.Sprintf("accept: %v", err))
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go p.serve(conn)
	}
}

// rateLog logs at most one line per `every`, saying how many it left out: a server
// that is down fails every request, and the log should say so once a second, not per request.
type rateLog struct {
	mu      sync.Mutex
	every   time.Duration
	last    time.Time
	skipped int
}

func (l *rateLog) note(line string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now := time.Now(); now.Sub(l.last) >= l.every {
		if l.skipped > 0 {
			line += fmt.Sprintf(" (and %d more like it since the last line)", l.skipped)
		}
		log.Print(line)
		l.last, l.skipped = now, 0
		return
	}
	l.skipped++
}
