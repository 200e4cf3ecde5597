package main

import (
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
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

func newFront(t *testing.T, u *upstream, token string) *httptest.Server {
	backend := httptest.NewServer(u)
	t.Cleanup(backend.Close)
	target, _ := url.Parse(backend.URL)
	g := newGate()
	proxy := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) { pr.SetURL(target) },
		ModifyResponse: func(resp *http.Response) error {
			if value := resp.Header.Get(gateHeader); value != "" {
				g.update(value)
				resp.Header.Del(gateHeader)
			}
			return nil
		},
	}
	var auth []byte
	if token != "" {
		auth = []byte("Bearer " + token)
	}
	f := &front{gate: g, proxy: proxy, secret: "s3cret", auth: auth, requestID: requestID}
	server := httptest.NewServer(f)
	t.Cleanup(server.Close)
	return server
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
	server := newFront(t, u, "")
	// A client's own X-Tenx-* headers never reach the server.
	first := post(t, server.URL, "critical", map[string]string{
		"X-Tenx-Front-Shed": "sheddable/evil/1000", "X-Tenx-Front-Passed": "1", "X-Tenx-Front": "guess",
	})
	if first.StatusCode != 200 || first.Header.Get(gateHeader) != "" {
		t.Fatalf("critical answered %d with gate %q", first.StatusCode, first.Header.Get(gateHeader))
	}
	seen := u.headers[0]
	if seen.Get(shedHeader) != "" || seen.Get(passedHeader) != "" || seen.Get(secretHeader) != "s3cret" {
		t.Fatalf("the server was sent %v", seen)
	}
	refused := post(t, server.URL, "Sheddable", map[string]string{"X-Tenant": "shop", "X-Request-Id": "abc-1"})
	if refused.StatusCode != 503 || refused.Header.Get("Retry-After") != "1" || refused.Header.Get("X-Request-Id") != "abc-1" {
		t.Fatalf("sheddable at a closed gate: %d %v", refused.StatusCode, refused.Header)
	}
	if len(u.headers) != 1 {
		t.Fatalf("a refused request reached the server")
	}
	post(t, server.URL, "critical", nil)
	if got := u.headers[1].Get(shedHeader); got != "sheddable/shop/1" {
		t.Fatalf("the next request carried %q, want sheddable/shop/1", got)
	}
	if got := u.headers[1].Get(passedHeader); got != "" {
		t.Fatalf("a critical request was marked passed: %q", got)
	}
}

func TestUnauthorizedRequestsAreLeftToTheServer(t *testing.T) {
	u := &upstream{gate: "0.0000 0 0"}
	server := newFront(t, u, "tok")
	post(t, server.URL, "critical", map[string]string{"Authorization": "Bearer tok"})
	resp := post(t, server.URL, "sheddable", map[string]string{"Authorization": "Bearer wrong"})
	if resp.StatusCode != 200 || len(u.headers) != 2 {
		t.Fatalf("a request without the token was judged by the front: %d", resp.StatusCode)
	}
	resp = post(t, server.URL, "sheddable", map[string]string{"Authorization": "Bearer tok"})
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
