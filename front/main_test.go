package main

import (
	"bufio"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func newGate() *gate {
	return &gate{stale: time.Minute, shedCount: make(map[[2]string]uint64), tenants: make(map[string]bool)}
}

func TestNoFreshGateDecidesNothing(t *testing.T) {
	g := newGate()
	if refusal, passed := g.judge("sheddable", "t"); refusal != "" || passed {
		t.Fatalf("a gate never seen refused or passed: %q %v", refusal, passed)
	}
	g.update("0.0000 0 0")
	g.seen = time.Now().Add(-2 * time.Minute)
	if refusal, _ := g.judge("default", "t"); refusal != "" {
		t.Fatalf("a stale gate refused: %q", refusal)
	}
	if report := g.report(); report != "" {
		t.Fatalf("nothing was refused, yet %q was reported", report)
	}
}

func TestSheddableShareIsEvenlySpacedAndMarkedPassed(t *testing.T) {
	g := newGate()
	g.update("0.2500 1 1")
	var pattern []bool
	for i := 0; i < 12; i++ {
		refusal, passed := g.judge("sheddable", "t")
		if (refusal == "") != passed {
			t.Fatalf("request %d: forwarded=%v but passed=%v", i, refusal == "", passed)
		}
		pattern = append(pattern, passed)
	}
	want := []bool{false, false, false, true, false, false, false, true, false, false, false, true}
	for i := range want {
		if pattern[i] != want[i] {
			t.Fatalf("passes %v, want one in four evenly: %v", pattern, want)
		}
	}
	if report := g.report(); report != "sheddable/t/9" {
		t.Fatalf("report %q, want sheddable/t/9", report)
	}
	if report := g.report(); report != "" {
		t.Fatalf("a report was taken twice: %q", report)
	}
}

func TestClosedQueuesRefuseTheirClassAndCriticalAlwaysGoes(t *testing.T) {
	g := newGate()
	g.update("1.0000 0 0")
	if refusal, _ := g.judge("default", "t"); !strings.Contains(refusal, "past the default mark") {
		t.Fatalf("default with its queue past the mark: %q", refusal)
	}
	if refusal, _ := g.judge("sheddable", "t"); !strings.Contains(refusal, "past the sheddable mark") {
		t.Fatalf("sheddable with its queue past the mark: %q", refusal)
	}
	for _, class := range []string{"critical", "urgent", ""} {
		if refusal, _ := g.judge(class, "t"); refusal != "" {
			t.Fatalf("class %q was refused by the front: %q", class, refusal)
		}
	}
	g.update("1.0000 1 0")
	if refusal, passed := g.judge("default", "t"); refusal != "" || passed {
		t.Fatalf("default with room: %q %v", refusal, passed)
	}
	g.update("garbage") // a malformed gate changes nothing
	if refusal, _ := g.judge("sheddable", "t"); refusal == "" {
		t.Fatal("a malformed gate header reopened the sheddable class")
	}
}

func TestReportEncodesTenantsAndGivesBackOnFailure(t *testing.T) {
	g := newGate()
	g.update("0.0000 1 1")
	g.judge("sheddable", "a b/c")
	g.judge("default", "a b/c")
	g.update("1.0000 0 1")
	g.judge("default", "x")
	report := g.report()
	if report != "default/x/1 sheddable/a%20b%2Fc/1" {
		t.Fatalf("report %q", report)
	}
	g.giveBack(report)
	if again := g.report(); again != report {
		t.Fatalf("given back %q, reported %q", report, again)
	}
}

func TestTenantLabelsAreBounded(t *testing.T) {
	g := newGate()
	g.update("0.0000 1 1")
	for i := 0; i < maxTenants+50; i++ {
		g.judge("sheddable", strings.Repeat("t", 1+i%200)+string(rune('a'+i%26)))
	}
	if len(g.tenants) > maxTenants+1 {
		t.Fatalf("%d tenant labels kept, bound %d", len(g.tenants), maxTenants)
	}
}

// upstream records what the server behind the front was sent and answers with a gate.
type upstream struct {
	mu      sync.Mutex
	gate    string
	headers []http.Header
}

func (u *upstream) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	u.mu.Lock()
	u.headers = append(u.headers, r.Header.Clone())
	gate := u.gate
	u.mu.Unlock()
	_, _ = io.Copy(io.Discard, r.Body)
	w.Header().Set(gateHeader, gate)
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write([]byte(`{"scores":[0.5]}`))
}

func newFront(t *testing.T, u http.Handler, token string) string {
	backend := httptest.NewServer(u)
	t.Cleanup(backend.Close)
	var auth []byte
	if token != "" {
		auth = []byte("Bearer " + token)
	}
	p := &proxy{
		gate: newGate(), upstream: strings.TrimPrefix(backend.URL, "http://"), secret: "s3cret", auth: auth,
		limits: limits{header: 5 * time.Second, idle: 5 * time.Second, body: 5 * time.Second,
			upstream: 5 * time.Second, upIdle: time.Second, maxHead: 4096},
		failures: &rateLog{every: time.Second},
	}
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = listener.Close() })
	go serve(listener, p)
	return "http://" + listener.Addr().String()
}

func post(t *testing.T, base, class string, headers map[string]string) *http.Response {
	req, _ := http.NewRequest(http.MethodPost, base+"/predict", strings.NewReader(`{"model":"m","entities":[1]}`))
	if class != "" {
		req.Header.Set("X-Priority", class)
	}
	for name, value := range headers {
		req.Header.Set(name, value)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	return resp
}

func TestFrontRefusesForwardsAndReportsThroughTheServer(t *testing.T) {
	u := &upstream{gate: "0.0000 1 1"}
	base := newFront(t, u, "")
	// A client's own X-Tenx-* headers never reach the server.
	first := post(t, base, "critical", map[string]string{
		"X-Tenx-Front-Shed": "sheddable/evil/1000", "X-Tenx-Front-Passed": "1", "X-Tenx-Front": "guess",
	})
	if first.StatusCode != 200 || first.Header.Get(gateHeader) != "" {
		t.Fatalf("critical answered %d with gate %q", first.StatusCode, first.Header.Get(gateHeader))
	}
	seen := u.headers[0]
	if seen.Get(shedHeader) != "" || seen.Get(passedHeader) != "" || seen.Get(secretHeader) != "s3cret" {
		t.Fatalf("the server was sent %v", seen)
	}
	refused := post(t, base, "Sheddable", map[string]string{"X-Tenant": "shop", "X-Request-Id": "abc-1"})
	if refused.StatusCode != 503 || refused.Header.Get("Retry-After") != "1" || refused.Header.Get("X-Request-Id") != "abc-1" {
		t.Fatalf("sheddable at a closed gate: %d %v", refused.StatusCode, refused.Header)
	}
	if len(u.headers) != 1 {
		t.Fatalf("a refused request reached the server")
	}
	long := post(t, base, "sheddable", map[string]string{"X-Tenant": strings.Repeat("t", maxTenantLen+1)})
	if long.StatusCode != 200 || len(u.headers) != 2 {
		t.Fatalf("a tenant name too long to count was judged by the front: %d", long.StatusCode)
	}
	if got := u.headers[1].Get(shedHeader); got != "sheddable/shop/1" {
		t.Fatalf("the next request carried %q, want sheddable/shop/1", got)
	}
	post(t, base, "critical", nil)
	if got := u.headers[2].Get(shedHeader); got != "" {
		t.Fatalf("a refusal was reported twice: %q", got)
	}
	if got := u.headers[2].Get(passedHeader); got != "" {
		t.Fatalf("a critical request was marked passed: %q", got)
	}
}

func TestUnauthorizedRequestsAreLeftToTheServer(t *testing.T) {
	u := &upstream{gate: "0.0000 0 0"}
	base := newFront(t, u, "tok")
	post(t, base, "critical", map[string]string{"Authorization": "Bearer tok"})
	resp := post(t, base, "sheddable", map[string]string{"Authorization": "Bearer wrong"})
	if resp.StatusCode != 200 || len(u.headers) != 2 {
		t.Fatalf("a request without the token was judged by the front: %d", resp.StatusCode)
	}
	resp = post(t, base, "sheddable", map[string]string{"Authorization": "Bearer tok"})
	if resp.StatusCode != 503 {
		t.Fatalf("an authorized sheddable request at a closed gate: %d", resp.StatusCode)
	}
}

func TestRequestIDRule(t *testing.T) {
	if got := requestID("abc-1"); got != "abc-1" {
		t.Fatalf("a sane id was replaced: %q", got)
	}
	for _, given := range []string{"", "has space", strings.Repeat("x", 65), "tab\t"} {
		if got := requestID(given); len(got) != 16 || got == given {
			t.Fatalf("id %q kept or malformed: %q", given, got)
		}
	}
}

// raw sends bytes on one connection and reads until `answers` whole answers (Content-Length
// framed) arrived; returns their status lines and bodies.
func raw(t *testing.T, base string, send string, answers int) ([]string, []string) {
	t.Helper()
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Write([]byte(send)); err != nil {
		t.Fatal(err)
	}
	reader := bufio.NewReader(conn)
	var statuses, bodies []string
	for len(statuses) < answers {
		resp, err := http.ReadResponse(reader, nil)
		if err != nil {
			t.Fatalf("after %d answers: %v", len(statuses), err)
		}
		body, _ := io.ReadAll(resp.Body)
		statuses = append(statuses, resp.Status)
		bodies = append(bodies, string(body))
	}
	return statuses, bodies
}

// echo answers with the request's body, framed as the request asked (?chunked answers in chunks).
type echo struct{ gate string }

func (e echo) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	w.Header().Set(gateHeader, e.gate)
	if r.URL.RawQuery == "chunked" {
		w.WriteHeader(200)
		for _, part := range strings.SplitAfter(string(body), ",") {
			_, _ = w.Write([]byte(part))
			w.(http.Flusher).Flush()
		}
		return
	}
	_, _ = w.Write(append([]byte(r.Header.Get("X-Priority")+":"), body...))
}

func TestPipelinedRequestsAreAnsweredInOrderRefusedOrNot(t *testing.T) {
	base := newFront(t, echo{gate: "0.0000 1 1"}, "")
	one := func(class, body string) string {
		return "POST /predict HTTP/1.1\r\nHost: x\r\nX-Priority: " + class + "\r\nContent-Length: " +
			strconv.Itoa(len(body)) + "\r\n\r\n" + body
	}
	statuses, bodies := raw(t, base, one("critical", "a")+one("sheddable", "bb")+one("critical", "ccc"), 3)
	if statuses[0] != "200 OK" || statuses[1] != "503 Service Unavailable" || statuses[2] != "200 OK" {
		t.Fatalf("statuses %v", statuses)
	}
	if bodies[0] != "critical:a" || bodies[2] != "critical:ccc" {
		t.Fatalf("bodies %v: the refused request's body was not dropped in step", bodies)
	}
}

func TestChunkedBodiesGoThroughBothWays(t *testing.T) {
	base := newFront(t, echo{gate: "1 1 1"}, "")
	request := "POST /predict?chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" +
		"4\r\nab,c\r\n3;ext=1\r\nde,\r\n0\r\n\r\n"
	statuses, bodies := raw(t, base, request+request, 2)
	if statuses[1] != "200 OK" || bodies[0] != "ab,cde," || bodies[1] != "ab,cde," {
		t.Fatalf("%v %q", statuses, bodies)
	}
}

func TestExpectContinueGetsItsInterimAnswerFromTheFront(t *testing.T) {
	base := newFront(t, echo{gate: "1 1 1"}, "")
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = conn.Write([]byte("POST /predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"))
	reader := bufio.NewReader(conn)
	line, _ := reader.ReadString('\n')
	if line != "HTTP/1.1 100 Continue\r\n" {
		t.Fatalf("first line %q", line)
	}
	_, _ = reader.ReadString('\n')
	_, _ = conn.Write([]byte("hi"))
	resp, err := http.ReadResponse(reader, nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || string(body) != ":hi" {
		t.Fatalf("%d %q", resp.StatusCode, body)
	}
}

func TestMalformedAndOversizedHeadsAreRefused(t *testing.T) {
	base := newFront(t, echo{gate: "1 1 1"}, "")
	statuses, _ := raw(t, base, "POST /predict HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 1)
	if statuses[0] != "400 Bad Request" {
		t.Fatalf("CL and TE together: %v", statuses)
	}
	statuses, _ = raw(t, base, "GET / HTTP/1.1\r\nX-Big: "+strings.Repeat("x", 5000)+"\r\n\r\n", 1)
	if statuses[0] != "431 Request Header Fields Too Large" {
		t.Fatalf("oversized head: %v", statuses)
	}
	statuses, _ = raw(t, base, "BROKEN\r\n\r\n", 1)
	if statuses[0] != "400 Bad Request" {
		t.Fatalf("malformed request line: %v", statuses)
	}
}

func TestAnIdleConnectionToTheServerIsNotReused(t *testing.T) {
	var mu sync.Mutex
	remotes := map[string]bool{}
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		remotes[r.RemoteAddr] = true
		mu.Unlock()
		_, _ = w.Write([]byte("ok"))
	})
	base := newFront(t, handler, "")
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	reader := bufio.NewReader(conn)
	get := func() {
		_, _ = conn.Write([]byte("GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n"))
		resp, err := http.ReadResponse(reader, nil)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.ReadAll(resp.Body)
	}
	get()
	get()
	if len(remotes) != 1 {
		t.Fatalf("a busy connection was not reused: %v", remotes)
	}
	time.Sleep(1200 * time.Millisecond) // past upIdle (1 s)
	get()
	if len(remotes) != 2 {
		t.Fatalf("an idle connection was reused: %v", remotes)
	}
}

func TestRequestTrailersNeverReachTheServer(t *testing.T) {
	var mu sync.Mutex
	var trailers []http.Header
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		trailers = append(trailers, r.Trailer.Clone())
		mu.Unlock()
		_, _ = w.Write(body)
	})
	base := newFront(t, handler, "")
	request := "POST /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTrailer: X-Tenx-Front-Shed\r\n\r\n" +
		"2\r\nab\r\n0\r\nX-Tenx-Front-Shed: default/evil/5000\r\nX-Other: 1\r\n\r\n"
	statuses, bodies := raw(t, base, request, 1)
	if statuses[0] != "200 OK" || bodies[0] != "ab" {
		t.Fatalf("%v %q", statuses, bodies)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(trailers) != 1 || trailers[0].Get("X-Tenx-Front-Shed") != "" || trailers[0].Get("X-Other") != "" {
		t.Fatalf("the server got trailers %v", trailers)
	}
}

func TestAnAnswerGoesOutWhileTheNextRequestIsIncomplete(t *testing.T) {
	base := newFront(t, echo{gate: "1 1 1"}, "")
	for _, after := range []string{"\r\n", "POST /predict HTTP/1.1\r\nHost: x\r\n"} {
		conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		_ = conn.SetDeadline(time.Now().Add(2 * time.Second)) // the front's header timeout here is 5 s
		_, _ = conn.Write([]byte("POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\na" + after))
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		if err != nil {
			t.Fatalf("with %q after the request: %v", after, err)
		}
		_ = resp.Body.Close()
		_ = conn.Close()
	}
}

// closingUpstream answers each request, then closes its connection without a word, as a
// server restarting or dropping idle connections does.
func closingUpstream(t *testing.T) string {
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = listener.Close() })
	go func() {
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				req, err := http.ReadRequest(bufio.NewReader(conn))
				if err != nil {
					return
				}
				_, _ = io.ReadAll(req.Body)
				_, _ = conn.Write([]byte("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
				time.Sleep(50 * time.Millisecond)
			}()
		}
	}()
	return listener.Addr().String()
}

func TestAClosedKeptConnectionToTheServerIsReplacedNotAnsweredWith502(t *testing.T) {
	p := &proxy{
		gate: newGate(), upstream: closingUpstream(t), secret: "s",
		limits: limits{header: time.Second, idle: time.Second, body: time.Second, upstream: time.Second,
			upIdle: time.Minute, maxHead: 4096},
		failures: &rateLog{every: time.Second},
	}
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = listener.Close() })
	go serve(listener, p)
	conn, err := net.Dial("tcp", listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	reader := bufio.NewReader(conn)
	for i := 0; i < 3; i++ {
		time.Sleep(100 * time.Millisecond) // the server has closed the kept connection by now
		_, _ = conn.Write([]byte("POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"))
		resp, err := http.ReadResponse(reader, nil)
		if err != nil {
			t.Fatal(err)
		}
		_ = resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Fatalf("request %d on a kept connection the server had closed: %d", i, resp.StatusCode)
		}
	}
}

func TestRefusalCountsSurviveARequestThatNeverReachedTheServer(t *testing.T) {
	u := &upstream{gate: "0.0000 1 1"}
	base := newFront(t, u, "")
	post(t, base, "critical", nil)
	post(t, base, "sheddable", map[string]string{"X-Tenant": ""}) // refused; an empty tenant is "" as in the server
	conn, err := net.Dial("tcp", strings.TrimPrefix(base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	_, _ = conn.Write([]byte("POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"))
	time.Sleep(50 * time.Millisecond)
	_ = conn.Close() // its body broke off: the report it took must go with the next one
	time.Sleep(50 * time.Millisecond)
	req, _ := http.NewRequest(http.MethodPost, base+"/metrics", nil) // not a scrape: takes no report
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	post(t, base, "critical", nil)
	last := u.headers[len(u.headers)-1]
	if got := last.Get(shedHeader); got != "sheddable//1" {
		t.Fatalf("the refusal count reached the server as %q, want sheddable//1", got)
	}
}
