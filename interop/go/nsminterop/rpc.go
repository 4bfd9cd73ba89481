package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/ioutil"
	"net"
	"os"
	"sync"
	"time"

	"github.com/golang-jwt/jwt/v4"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// Metadata keys of NSM's per-RPC token credentials (sdk pkg/tools/token).
const (
	tokenKey   = "nsm-client-token"
	expiresKey = "nsm-client-token-expires"
)

// rawCodec passes message bytes through untouched, so this program needs no generated protobuf
// code: the driver serializes with the project's own message classes. It satisfies both
// encoding.Codec (for grpc.ForceCodec on calls) and the older grpc.Codec (for the server's
// grpc.CustomCodec, the only whole-server override grpc-go 1.33 has). With ForceCodec the
// content-type stays "application/grpc", as a proto-codec Go peer sends it.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) {
	switch message := v.(type) {
	case *[]byte:
		return *message, nil
	case []byte:
		return message, nil
	}
	return nil, fmt.Errorf("rawCodec cannot marshal a %T", v)
}

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	message, ok := v.(*[]byte)
	if !ok {
		return fmt.Errorf("rawCodec cannot unmarshal into a %T", v)
	}
	// grpc-go may reuse its receive buffer after Unmarshal returns.
	*message = append([]byte(nil), data...)
	return nil
}

func (rawCodec) Name() string   { return "proto" }
func (rawCodec) String() string { return "proto" }

// tlsFiles are the PEM files of one side's X.509-SVID and the trust bundle.
type tlsFiles struct {
	cert, key, bundle string
}

func (files *tlsFiles) register(flags *flag.FlagSet) {
	flags.StringVar(&files.cert, "cert", "", "PEM file: own SVID chain, leaf first")
	flags.StringVar(&files.key, "key", "", "PEM file: own PKCS#8 private key")
	flags.StringVar(&files.bundle, "bundle", "", "PEM file: the trust bundle (CA certificates)")
}

// load returns the own certificate and the bundle pool.
func (files *tlsFiles) load() (tls.Certificate, *x509.CertPool, error) {
	certificate, err := tls.LoadX509KeyPair(files.cert, files.key)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	certificate.Leaf, err = x509.ParseCertificate(certificate.Certificate[0])
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	roots, err := readBundle(files.bundle)
	if err != nil {
		return tls.Certificate{}, nil, err
	}
	return certificate, roots, nil
}

// clientTLS is go-spiffe's tlsconfig.MTLSClientConfig with AuthorizeAny, plus the TLS 1.2
// floor NSM's commands set: the standard verification is switched off (it would check a host
// name, and a SPIFFE peer has none) and replaced by a chain check in VerifyPeerCertificate.
func clientTLS(own tls.Certificate, roots *x509.CertPool) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &own, nil
		},
		InsecureSkipVerify: true,
		VerifyPeerCertificate: func(rawCerts [][]byte, _ [][]*x509.Certificate) error {
			_, err := verifySVIDChain(rawCerts, roots)
			return err
		},
	}
}

// serverTLS is go-spiffe's tlsconfig.MTLSServerConfig with AuthorizeAny: any client
// certificate is requested and required, then checked against the bundle by hand.
func serverTLS(own tls.Certificate, roots *x509.CertPool) *tls.Config {
	return &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{own},
		ClientAuth:   tls.RequireAnyClientCert,
		VerifyPeerCertificate: func(rawCerts [][]byte, _ [][]*x509.Certificate) error {
			_, err := verifySVIDChain(rawCerts, roots)
			return err
		},
	}
}

func tlsVersionName(version uint16) string {
	switch version {
	case tls.VersionTLS12:
		return "TLS1.2"
	case tls.VersionTLS13:
		return "TLS1.3"
	}
	return fmt.Sprintf("0x%04x", version)
}

// nsmCredentials is the sdk's token.NewPerRPCCredentials(spiffejwt.TokenGeneratorFunc(...)):
// for every call it signs a token for the TLS peer it finds in the context (aud = the peer
// leaf's SPIFFE ID, the expiry capped by both leaves' NotAfter) and sends it with its expiry.
type nsmCredentials struct {
	key         *ecdsa.PrivateKey
	ownID       string
	ownNotAfter time.Time
	lifetime    time.Duration
	location    *time.Location

	mu      sync.Mutex
	token   string
	expires string
}

func (c *nsmCredentials) GetRequestMetadata(ctx context.Context, _ ...string) (map[string]string, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, errors.New("no peer in the context")
	}
	token, expires, err := signForPeer(c.key, c.ownID, c.ownNotAfter, c.lifetime, p)
	if err != nil {
		return nil, err
	}
	// The sdk formats in the process's local zone; -zone stands in for that.
	expiresText := expires.In(c.location).Format(time.RFC3339Nano)
	c.mu.Lock()
	c.token, c.expires = token, expiresText
	c.mu.Unlock()
	return map[string]string{tokenKey: token, expiresKey: expiresText}, nil
}

func (c *nsmCredentials) RequireTransportSecurity() bool { return true }

// signForPeer is the sdk's spiffejwt.TokenGeneratorFunc: a token for the TLS peer of p (aud =
// its leaf's SPIFFE ID; none without a TLS peer) and its expiry. Clients sign with it per call,
// servers for their hop of a path. As in the sdk, the peer leaf's NotAfter caps the expiry that
// is returned (and sent as nsm-client-token-expires) but not the exp claim, which is set before.
func signForPeer(key *ecdsa.PrivateKey, ownID string, ownNotAfter time.Time, lifetime time.Duration, p *peer.Peer) (string, time.Time, error) {
	expires := time.Now().Add(lifetime)
	if ownNotAfter.Before(expires) {
		expires = ownNotAfter
	}
	claims := jwt.RegisteredClaims{Subject: ownID, ExpiresAt: jwt.NewNumericDate(expires)}
	if info, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(info.State.PeerCertificates) > 0 {
		leaf := info.State.PeerCertificates[0]
		peerID, err := spiffeID(leaf)
		if err != nil {
			return "", time.Time{}, err
		}
		if leaf.NotAfter.Before(expires) {
			expires = leaf.NotAfter
		}
		claims.Audience = []string{peerID}
	}
	token, err := jwt.NewWithClaims(jwt.SigningMethodES256, claims).SignedString(key)
	return token, expires, err
}

// callResult is what call prints: the status, who answered, and how long the call took
// (connecting and the TLS handshake included: the call makes the connection).
type callResult struct {
	Code        string   `json:"code"`
	Message     string   `json:"message,omitempty"`
	PeerID      string   `json:"peer_id,omitempty"`
	ALPN        string   `json:"alpn,omitempty"`
	TLSVersion  string   `json:"tls_version,omitempty"`
	CallMillis  float64  `json:"call_ms"`
	ResponseLen int      `json:"response_len"`
	HeaderKeys  []string `json:"header_keys,omitempty"`
	HeaderPath  []string `json:"header_path,omitempty"` // the registry's `path` answers, if any
	SentToken   string   `json:"sent_token,omitempty"`
	SentExpires string   `json:"sent_expires,omitempty"`
}

// callCommand makes one unary call over a UNIX socket with mutual TLS, as an NSM client
// does towards nsmgr or an endpoint. The metadata comes from a JSON file of [key, value] pairs
// (kept off the command line, and a key may repeat, to test the one-value rule), or, with
// -sign-key, from per-RPC credentials that sign for the TLS peer as the sdk does.
func callCommand(args []string) error {
	flags := flag.NewFlagSet("call", flag.ExitOnError)
	var files tlsFiles
	files.register(flags)
	socket := flags.String("socket", "", "UNIX socket path of the server")
	method := flags.String("method", "", "full method name, e.g. /networkservice.NetworkService/Request")
	inPath := flags.String("in", "", "file with the serialized request message")
	outPath := flags.String("out", "", "file to write the serialized response to")
	metadataPath := flags.String("metadata", "", "JSON file: [[key, value], ...] to send")
	sign := flags.Bool("sign", false, "sign the token per call with -key for the TLS peer (the sdk's per-RPC credentials)")
	lifetime := flags.Duration("lifetime", 10*time.Minute, "with -sign: the token lifetime")
	zone := flags.String("zone", "Z", "with -sign: zone of the expiry text, Z or ±hh:mm")
	timeout := flags.Duration("timeout", 10*time.Second, "deadline for dialing plus the call")
	if err := flags.Parse(args); err != nil {
		return err
	}
	own, roots, err := files.load()
	if err != nil {
		return err
	}
	request, err := ioutil.ReadFile(*inPath)
	if err != nil {
		return err
	}
	var pairs [][2]string
	if *metadataPath != "" {
		data, err := ioutil.ReadFile(*metadataPath)
		if err != nil {
			return err
		}
		if err := json.Unmarshal(data, &pairs); err != nil {
			return fmt.Errorf("%s: %w", *metadataPath, err)
		}
	}

	var options []grpc.DialOption
	var creds *nsmCredentials
	if *sign {
		location, err := parseZone(*zone)
		if err != nil {
			return err
		}
		if creds, err = newCredentials(own, *lifetime, location); err != nil {
			return err
		}
		options = append(options, grpc.WithPerRPCCredentials(creds))
	}

	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	var result callResult
	conn, err := dialUnix(ctx, *socket, own, roots, options...)
	if err != nil {
		return err // only bad options get here: the connection is made by the call
	}
	defer conn.Close()

	for _, pair := range pairs {
		ctx = metadata.AppendToOutgoingContext(ctx, pair[0], pair[1])
	}
	var response []byte
	var answeredBy peer.Peer
	var header metadata.MD
	started := time.Now()
	err = conn.Invoke(ctx, *method, &request, &response,
		grpc.ForceCodec(rawCodec{}), grpc.Peer(&answeredBy), grpc.Header(&header))
	result.CallMillis = millis(time.Since(started))
	result.Code = status.Code(err).String()
	if err != nil {
		result.Message = status.Convert(err).Message()
	}
	_, result.ALPN, result.TLSVersion, result.PeerID = tlsPeer(answeredBy)
	for key := range header {
		result.HeaderKeys = append(result.HeaderKeys, key)
	}
	result.HeaderPath = header.Get(pathKey)
	if creds != nil {
		creds.mu.Lock()
		result.SentToken, result.SentExpires = creds.token, creds.expires
		creds.mu.Unlock()
	}
	if err == nil {
		result.ResponseLen = len(response)
		if *outPath != "" {
			if err := ioutil.WriteFile(*outPath, response, 0o600); err != nil {
				return err
			}
		}
	}
	printJSON(result)
	return nil
}

// dialUnix makes a client connection to a UNIX socket with our mutual TLS. grpc-go 1.33 has no
// unix: resolver: the socket is dialled directly. Newer grpc-go (as NSM uses) names UNIX targets
// "localhost", so the authority and SNI are that here too. No WithBlock: grpc-go 1.33 takes a
// refused handshake for a temporary error and would retry until the deadline; without it a call
// fails at once with the handshake's error as its message, which is what the driver wants.
func dialUnix(ctx context.Context, socket string, own tls.Certificate, roots *x509.CertPool, extra ...grpc.DialOption) (*grpc.ClientConn, error) {
	options := append([]grpc.DialOption{
		grpc.WithTransportCredentials(credentials.NewTLS(clientTLS(own, roots))),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var dialer net.Dialer
			return dialer.DialContext(ctx, "unix", socket)
		}),
		grpc.WithAuthority("localhost"),
	}, extra...)
	return grpc.DialContext(ctx, "passthrough:///localhost", options...)
}

// newCredentials are the sdk's per-RPC token credentials for the SVID `own` (an EC key).
func newCredentials(own tls.Certificate, lifetime time.Duration, location *time.Location) (*nsmCredentials, error) {
	key, ok := own.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return nil, errors.New("signing tokens needs an EC key")
	}
	ownID, err := spiffeID(own.Leaf)
	if err != nil {
		return nil, err
	}
	return &nsmCredentials{key: key, ownID: ownID, ownNotAfter: own.Leaf.NotAfter, lifetime: lifetime, location: location}, nil
}

// tlsPeer is what the handshake told about the other end: its TLS info, the ALPN protocol,
// the TLS version and the SPIFFE ID of its leaf ("" for what is not known).
func tlsPeer(p peer.Peer) (credentials.TLSInfo, string, string, string) {
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok {
		return info, "", "", ""
	}
	id := ""
	if len(info.State.PeerCertificates) > 0 {
		id, _ = spiffeID(info.State.PeerCertificates[0])
	}
	return info, info.State.NegotiatedProtocol, tlsVersionName(info.State.Version), id
}

func millis(d time.Duration) float64 {
	return float64(d.Microseconds()) / 1000
}

// serveEvent is one line serve prints per call: what an NSM server would see and decide.
type serveEvent struct {
	Event      string       `json:"event"`
	Method     string       `json:"method,omitempty"`
	PeerID     string       `json:"peer_id,omitempty"`
	ALPN       string       `json:"alpn,omitempty"`
	TLSVersion string       `json:"tls_version,omitempty"`
	RequestLen int          `json:"request_len"`
	Token      verifyResult `json:"token"`
	Denied     string       `json:"denied,omitempty"`
	Socket     string       `json:"socket,omitempty"`
}

// serveCommand runs a gRPC server on a UNIX socket with mutual TLS that accepts any method,
// checks each caller's token as NSM's server chain would (token.FromContext: one value per
// key, the expiry parsed with time.RFC3339Nano; the token signed by the TLS peer's key, not
// expired, and chained: our own SPIFFE ID in its aud), answers with the bytes of -reply or
// PERMISSION_DENIED, and prints one JSON line per call. It stops when stdin closes, so the
// driver needs no signal to end it.
func serveCommand(args []string) error {
	flags := flag.NewFlagSet("serve", flag.ExitOnError)
	var files tlsFiles
	files.register(flags)
	socket := flags.String("socket", "", "UNIX socket path to listen on")
	replyPath := flags.String("reply", "", "file with the serialized response message")
	if err := flags.Parse(args); err != nil {
		return err
	}
	own, roots, err := files.load()
	if err != nil {
		return err
	}
	ownID, err := spiffeID(own.Leaf)
	if err != nil {
		return err
	}
	reply, err := ioutil.ReadFile(*replyPath)
	if err != nil {
		return err
	}

	handler := func(_ interface{}, stream grpc.ServerStream) error {
		var event serveEvent
		event.Event = "call"
		event.Method, _ = grpc.MethodFromServerStream(stream)
		var request []byte
		if err := stream.RecvMsg(&request); err != nil {
			return err
		}
		event.RequestLen = len(request)
		denial := checkCaller(stream.Context(), ownID, &event)
		if denial != "" {
			event.Denied = denial
			printLine(event)
			return status.Error(codes.PermissionDenied, denial)
		}
		printLine(event)
		return stream.SendMsg(&reply)
	}

	return serveUntilStdinCloses(*socket, serverTLS(own, roots), handler)
}

// printing keeps server lines whole: handlers run on several goroutines.
var printing sync.Mutex

func printLine(value interface{}) {
	printing.Lock()
	defer printing.Unlock()
	printJSON(value)
}

// serveUntilStdinCloses runs a gRPC server with mutual TLS on a UNIX socket that hands every
// call, whatever its method, to handler with raw message bytes. It prints a "ready" line once
// it listens and a "stopped" line at the end, and it stops when stdin closes, so the driver
// needs no signal to end it.
func serveUntilStdinCloses(socket string, config *tls.Config, handler grpc.StreamHandler) error {
	server := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(config)),
		grpc.CustomCodec(rawCodec{}),
		grpc.UnknownServiceHandler(handler),
	)
	listener, err := net.Listen("unix", socket)
	if err != nil {
		return err
	}
	served := make(chan error, 1)
	go func() { served <- server.Serve(listener) }()
	printLine(serveEvent{Event: "ready", Socket: socket})

	_, _ = ioutil.ReadAll(os.Stdin)
	server.Stop() // closes the listener, which removes the socket file
	<-served
	printLine(serveEvent{Event: "stopped"})
	return nil
}

// checkCaller is the part of NSM's server chain that reads the caller's token: "" when it
// passes, else why not. It fills in what it saw for the driver to compare.
func checkCaller(ctx context.Context, ownID string, event *serveEvent) string {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "no peer"
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.PeerCertificates) == 0 {
		return "no TLS peer certificate"
	}
	event.ALPN = info.State.NegotiatedProtocol
	event.TLSVersion = tlsVersionName(info.State.Version)
	leaf := info.State.PeerCertificates[0]
	event.PeerID, _ = spiffeID(leaf)

	md, _ := metadata.FromIncomingContext(ctx)
	tokens, expiries := md.Get(tokenKey), md.Get(expiresKey)
	if len(tokens) != 1 {
		return fmt.Sprintf("%s has %d values, expected 1", tokenKey, len(tokens))
	}
	if len(expiries) != 1 {
		return fmt.Sprintf("%s has %d values, expected 1", expiresKey, len(expiries))
	}
	event.Token = checkToken(tokens[0], leaf.PublicKey)
	expires, err := time.Parse(time.RFC3339Nano, expiries[0])
	if err != nil {
		event.Token.ExpiresError = err.Error()
		return fmt.Sprintf("%s: %v", expiresKey, err)
	}
	nanos := expires.UnixNano()
	event.Token.ExpiresUnixNano = &nanos
	event.Token.Expires = expiries[0]
	if !event.Token.OK {
		return "token: " + event.Token.Error
	}
	for _, audience := range event.Token.Aud {
		if audience == ownID {
			return ""
		}
	}
	return fmt.Sprintf("token aud %v does not hold our ID %s", event.Token.Aud, ownID)
}
