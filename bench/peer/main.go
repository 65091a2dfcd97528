// Command peer is the benchmark's compiled peer of the ingest contract: the same
// POST /v1/call-status as service/app.py, in Go with net/http and franz-go, so that
// `make bench` can say how far the Python service is from a compiled one on the same
// machine and broker.
//
// Per request it does what the service does: cap the body, check FreeClimb-Signature
// (t=<unix>,v1=hex(HMAC-SHA256(secret, "<t>."+body)), any v1 under any secret, tolerance
// both ways), decode the JSON once and check the call's id and status, produce one
// acks=all idempotent record keyed by callId (no compression), and answer 202 only after
// the broker's ack (503 when it does not come in time). It prints "listening <addr>" on
// stdout once it serves. Not shipped: it exists for the benchmark only.
package main

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

var (
	callID   = regexp.MustCompile(`^CA[0-9a-f]{40}$`)
	statuses = map[string]bool{
		"queued": true, "ringing": true, "inProgress": true, "canceled": true,
		"completed": true, "busy": true, "failed": true, "noAnswer": true,
	}
)

type server struct {
	client    *kgo.Client
	topic     string
	secrets   [][]byte
	tolerance int64
	maxBody   int64
	timeout   time.Duration
}

// verify mirrors service/signature.py: any v1 under any secret, |now - t| <= tolerance.
func (s *server) verify(header string, body []byte, now int64) bool {
	if header == "" || len(header) > 4096 {
		return false
	}
	var t int64 = -1
	var sigs [][]byte
	for _, part := range strings.Split(header, ",") {
		key, value, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			return false
		}
		switch strings.TrimSpace(key) {
		case "t":
			v, err := strconv.ParseInt(strings.TrimSpace(value), 10, 64)
			if err != nil || t != -1 {
				return false
			}
			t = v
		case "v1":
			d, err := hex.DecodeString(strings.TrimSpace(value))
			if err != nil || len(d) != sha256.Size {
				return false
			}
			sigs = append(sigs, d)
		}
	}
	if t < 0 || len(sigs) == 0 || now-t > s.tolerance || t-now > s.tolerance {
		return false
	}
	prefix := strconv.AppendInt(nil, t, 10)
	prefix = append(prefix, '.')
	for _, secret := range s.secrets {
		mac := hmac.New(sha256.New, secret)
		mac.Write(prefix)
		mac.Write(body)
		expected := mac.Sum(nil)
		for _, sig := range sigs {
			if hmac.Equal(expected, sig) {
				return true
			}
		}
	}
	return false
}

type webhook struct {
	CallID      string  `json:"callId"`
	CallStatus  *string `json:"callStatus"`
	Status      *string `json:"status"`
	RequestType *string `json:"requestType"`
}

func problem(w http.ResponseWriter, code int, kind, detail string) {
	w.Header().Set("Content-Type", "application/problem+json")
	w.WriteHeader(code)
	fmt.Fprintf(w, `{"type":"urn:callstatus:%s","status":%d,"detail":%q}`, kind, code, detail)
}

func uuid4() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

func (s *server) ingest(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		problem(w, http.StatusMethodNotAllowed, "method-not-allowed", "POST only")
		return
	}
	if !strings.HasPrefix(r.Header.Get("Content-Type"), "application/json") {
		problem(w, http.StatusUnsupportedMediaType, "unsupported-media-type", "send JSON")
		return
	}
	raw, err := io.ReadAll(http.MaxBytesReader(w, r.Body, s.maxBody))
	if err != nil {
		problem(w, http.StatusRequestEntityTooLarge, "body-too-large", "body too large")
		return
	}
	if !s.verify(r.Header.Get("FreeClimb-Signature"), raw, time.Now().Unix()) {
		problem(w, http.StatusUnauthorized, "invalid-signature", "signature check failed")
		return
	}
	var body webhook
	if err := json.Unmarshal(raw, &body); err != nil {
		problem(w, http.StatusBadRequest, "not-json", "body is not a JSON object")
		return
	}
	status := body.CallStatus
	source := "webhook"
	if status == nil {
		status, source = body.Status, "resource"
	}
	if !callID.MatchString(body.CallID) || status == nil || !statuses[*status] {
		problem(w, http.StatusUnprocessableEntity, "invalid-call-status", "bad callId or status")
		return
	}
	eventID := uuid4()
	requestType, _ := json.Marshal(body.RequestType)
	var value bytes.Buffer
	value.Grow(len(raw) + 160)
	value.WriteString(`{"eventId":"` + eventID + `","receivedAt":"`)
	value.WriteString(time.Now().UTC().Format("2006-01-02T15:04:05.000Z07:00"))
	value.WriteString(`","source":"` + source + `","requestType":`)
	value.Write(requestType)
	value.WriteString(`,"body":`)
	value.Write(raw)
	value.WriteByte('}')
	record := &kgo.Record{
		Topic: s.topic,
		Key:   []byte(body.CallID),
		Value: value.Bytes(),
		Headers: []kgo.RecordHeader{
			{Key: "content-type", Value: []byte("application/json")},
			{Key: "ce_id", Value: []byte(eventID)},
		},
	}
	ctx, cancel := context.WithTimeout(r.Context(), s.timeout)
	defer cancel()
	if err := s.client.ProduceSync(ctx, record).FirstErr(); err != nil {
		w.Header().Set("Retry-After", "5")
		problem(w, http.StatusServiceUnavailable, "kafka-unavailable", "event not stored")
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusAccepted)
	fmt.Fprintf(w, `{"eventId":"%s","callId":"%s"}`, eventID, body.CallID)
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	brokers := flag.String("brokers", "127.0.0.1:9092", "bootstrap servers, comma-separated")
	topic := flag.String("topic", "", "ingest topic")
	secrets := flag.String("secrets", "", "signing secrets, comma-separated")
	flag.Parse()
	if *topic == "" || *secrets == "" {
		log.Fatal("peer: -topic and -secrets are required")
	}
	client, err := kgo.NewClient(
		kgo.SeedBrokers(strings.Split(*brokers, ",")...),
		kgo.RequiredAcks(kgo.AllISRAcks()), // idempotence is franz-go's default with acks=all
		kgo.ProducerBatchCompression(kgo.NoCompression()),
		kgo.ProducerLinger(0),
	)
	if err != nil {
		log.Fatalf("peer: kafka client: %v", err)
	}
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	if err := client.Ping(ctx); err != nil {
		log.Fatalf("peer: kafka unreachable: %v", err)
	}
	cancel()
	s := &server{client: client, topic: *topic, tolerance: 300, maxBody: 65536, timeout: 5 * time.Second}
	for _, secret := range strings.Split(*secrets, ",") {
		s.secrets = append(s.secrets, []byte(secret))
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/call-status", s.ingest)
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusOK) })
	listener, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatalf("peer: listen: %v", err)
	}
	fmt.Fprintf(os.Stdout, "listening %s\n", listener.Addr())
	log.Fatal(http.Serve(listener, mux))
}
