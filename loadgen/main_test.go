package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseHead(t *testing.T) {
	cases := []struct {
		head            string
		status, length  int
		closes          bool
		wantErrContains string
	}{
		{head: "HTTP/1.1 200 OK\r\nContent-Length: 11", status: 200, length: 11},
		{head: "HTTP/1.1 503 Service Unavailable\r\ncontent-length:0\r\nRetry-After: 1", status: 503},
		{head: "HTTP/1.1 200 OK\r\nConnection: close\r\nCONTENT-LENGTH: 2", status: 200, length: 2, closes: true},
		{head: "HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2", status: 200, length: 2},
		{head: "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked", wantErrContains: "no Content-Length"},
		{head: "HTTP/1.1 200 OK\r\nContent-Length: -1", wantErrContains: "malformed Content-Length"},
		{head: "HTTP/1.1 2x0 OK\r\nContent-Length: 1", wantErrContains: "malformed response head"},
		{head: "SSH-2.0-OpenSSH", wantErrContains: "malformed response head"},
	}
	for _, c := range cases {
		status, length, closes, err := parseHead([]byte(c.head))
		if c.wantErrContains != "" {
			if err == nil || !strings.Contains(err.Error(), c.wantErrContains) {
				t.Errorf("%q: error %v, want one containing %q", c.head, err, c.wantErrContains)
			}
			continue
		}
		if err != nil || status != c.status || length != c.length || closes != c.closes {
			t.Errorf("%q: got (%d, %d, %v, %v), want (%d, %d, %v, nil)",
				c.head, status, length, closes, err, c.status, c.length, c.closes)
		}
	}
}

func TestInputsAreCheckedWithAClearError(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}
	if _, err := readTimes(write("odd.f64", make([]byte, 12))); err == nil || !strings.Contains(err.Error(), "whole number") {
		t.Errorf("12 bytes of times: %v", err)
	}
	unsorted := []byte{0, 0, 0, 0, 0, 0, 0xf0, 0x3f, 0, 0, 0, 0, 0, 0, 0, 0} // 1.0 then 0.0
	if _, err := readTimes(write("unsorted.f64", unsorted)); err == nil || !strings.Contains(err.Error(), "sorted finite") {
		t.Errorf("unsorted times: %v", err)
	}
	if _, err := readRequests(write("short.bin", []byte{9, 0, 0, 0, 'a'})); err == nil || !strings.Contains(err.Error(), "claims 9 bytes") {
		t.Errorf("truncated request: %v", err)
	}
	if _, err := readRequests(write("empty.bin", nil)); err == nil || !strings.Contains(err.Error(), "no requests") {
		t.Errorf("no requests: %v", err)
	}
	requests, err := readRequests(write("two.bin", []byte{1, 0, 0, 0, 'a', 2, 0, 0, 0, 'b', 'c'}))
	if err != nil || len(requests) != 2 || string(requests[1]) != "bc" {
		t.Errorf("two requests: %q, %v", requests, err)
	}
}
