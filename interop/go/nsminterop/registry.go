package main

import (
	"context"
	"crypto/ecdsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/ioutil"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
)

// The registry's private path travels under this metadata key, in both directions (the sdk's
// grpcmetadata package).
const pathKey = "path"

// The two calls that carry a path: only NSE registrations are played here (the NS calls carry
// the path the same way).
const (
	registerMethod   = "/registry.NetworkServiceEndpointRegistry/Register"
	unregisterMethod = "/registry.NetworkServiceEndpointRegistry/Unregister"
)

// registryPath has the shape of the sdk's grpcmetadata.Path and PathSegment
// (pkg/registry/common/grpcmetadata/path.go): the Go field names, no tag on the path and the
// single "token" tag on a segment are what decide the JSON on the wire, so they must stay
// exactly so. encoding/json does the rest, as it does for the sdk.
type registryPath struct {
	Index        uint32
	PathSegments []*registryPathSegment
}

type registryPathSegment struct {
	Token string `json:"token"`
}

// updateRegistryPath is what the sdk's registry updatepath server does with the path a caller
// sent (pkg/registry/common/updatepath/common.go): a path without segments is a first call and
// becomes [caller, own] at index 1; otherwise the index must leave room for the caller's
// segment, whose token is replaced with the caller's current one, and the next segment, ours,
// gets our new token or is appended. It returns the index to answer the caller with: its own,
// one less than ours.
func updateRegistryPath(path *registryPath, callerToken, ownToken string) (uint32, error) {
	if len(path.PathSegments) == 0 {
		path.PathSegments = append(path.PathSegments,
			&registryPathSegment{Token: callerToken}, &registryPathSegment{Token: ownToken})
		path.Index = 1
		return path.Index - 1, nil
	}
	if int(path.Index)+1 > len(path.PathSegments) {
		// The sdk's own words, so that the driver can compare them with ours.
		return 0, fmt.Errorf("Path.Index+1==%d should be less or equal len(Path.PathSegments)==%d",
			int(path.Index)+1, len(path.PathSegments))
	}
	// A JSON null in the array decodes to a nil segment, on which the sdk would panic; say so
	// instead of taking the whole server down.
	for _, segment := range path.PathSegments[path.Index:] {
		if segment == nil {
			return 0, errors.New("a null path segment (the sdk would panic on it)")
		}
	}
	path.PathSegments[path.Index].Token = callerToken
	path.Index++
	if int(path.Index) == len(path.PathSegments) {
		path.PathSegments = append(path.PathSegments, &registryPathSegment{Token: ownToken})
	} else {
		path.PathSegments[path.Index].Token = ownToken
	}
	return path.Index - 1, nil
}

// pathFromMetadata is the sdk's grpcmetadata fromMD: the last `path` value (a repeated key is
// not an error), decoded by encoding/json into a fresh path.
func pathFromMetadata(values []string) (*registryPath, error) {
	if len(values) == 0 {
		return nil, errors.New("failed to load path from grpc metadata")
	}
	path := &registryPath{}
	if err := json.Unmarshal([]byte(values[len(values)-1]), path); err != nil {
		return nil, err
	}
	return path, nil
}

// marshalPath is json.Marshal of a path as text; a registryPath always encodes.
func marshalPath(path *registryPath) string {
	data, err := json.Marshal(path)
	if err != nil {
		panic(err)
	}
	return string(data)
}

// registryEvent is the line the registry server prints per call: what it received, how Go
// decoded it, and what it answered.
type registryEvent struct {
	Event       string       `json:"event"`
	Method      string       `json:"method"`
	PeerID      string       `json:"peer_id,omitempty"`
	ALPN        string       `json:"alpn,omitempty"`
	TLSVersion  string       `json:"tls_version,omitempty"`
	RequestLen  int          `json:"request_len"`
	PathValues  []string     `json:"path_values"`          // every `path` value, as received
	PathError   string       `json:"path_error,omitempty"` // why none was usable
	Received    string       `json:"received,omitempty"`   // json.Marshal of what Go decoded
	Token       string       `json:"token,omitempty"`      // the caller's nsm-client-token
	TokenCheck  verifyResult `json:"token_check"`          // golang-jwt on it, TLS peer's key
	OwnToken    string       `json:"own_token,omitempty"`  // ours, for the caller
	Answered    string       `json:"answered,omitempty"`   // the `path` header sent back
	HeaderError string       `json:"header_error,omitempty"`
	Error       string       `json:"error,omitempty"` // the call's error status message
	ReplyLen    int          `json:"reply_len"`       // bytes of the answer message
}

// registryCommand runs the registry side of NSM's path metadata on a UNIX socket with mutual
// TLS: for NSE Register and Unregister it does what the sdk's grpcmetadata and updatepath
// servers do (decode the caller's `path`, put the caller's token and our own in it, answer it
// in the `path` response header), answers Register with the request's bytes and Unregister with
// an empty message, and prints one registryEvent per call. There is no store and no authorize:
// the driver judges the tokens from the printed lines.
func registryCommand(args []string) error {
	flags := flag.NewFlagSet("registry", flag.ExitOnError)
	var files tlsFiles
	files.register(flags)
	socket := flags.String("socket", "", "UNIX socket path to listen on")
	lifetime := flags.Duration("lifetime", 10*time.Minute, "lifetime of the tokens we put in paths")
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
	key, ok := own.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return errors.New("the registry needs an EC key")
	}

	handler := func(_ interface{}, stream grpc.ServerStream) error {
		event := registryEvent{Event: "call"}
		event.Method, _ = grpc.MethodFromServerStream(stream)
		var request []byte
		if err := stream.RecvMsg(&request); err != nil {
			return err
		}
		event.RequestLen = len(request)
		if event.Method != registerMethod && event.Method != unregisterMethod {
			event.Error = "not a registration"
			printLine(event)
			return status.Errorf(codes.Unimplemented, "%s is not played here", event.Method)
		}
		answer, err := registryCall(stream, &event, key, ownID, own.Leaf.NotAfter, *lifetime)
		if err != nil {
			event.Error = status.Convert(err).Message()
			printLine(event)
			return err
		}
		var reply []byte // an Unregister answers google.protobuf.Empty: no bytes at all
		if event.Method == registerMethod {
			reply = request
		}
		event.Answered, event.ReplyLen = answer, len(reply)
		printLine(event)
		return stream.SendMsg(&reply)
	}
	return serveUntilStdinCloses(*socket, serverTLS(own, roots), handler)
}

// registryCall is one registration at our hop; it returns the path it answered ("" for none).
func registryCall(stream grpc.ServerStream, event *registryEvent, key *ecdsa.PrivateKey, ownID string, ownNotAfter time.Time, lifetime time.Duration) (string, error) {
	ctx := stream.Context()
	p, ok := peer.FromContext(ctx)
	if !ok {
		return "", status.Error(codes.Internal, "no peer")
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.PeerCertificates) == 0 {
		return "", status.Error(codes.Unauthenticated, "no TLS peer certificate")
	}
	event.ALPN = info.State.NegotiatedProtocol
	event.TLSVersion = tlsVersionName(info.State.Version)
	event.PeerID, _ = spiffeID(info.State.PeerCertificates[0])

	md, _ := metadata.FromIncomingContext(ctx)
	event.PathValues = md.Get(pathKey)
	if event.PathValues == nil {
		event.PathValues = []string{} // printed as [], so "none" and "not printed" differ
	}
	// The sdk's grpcmetadata server: no usable path is only a warning; the chain then goes on
	// with an empty path and nothing is answered in the header.
	path, pathErr := pathFromMetadata(event.PathValues)
	answerPath := pathErr == nil
	if pathErr != nil {
		event.PathError = pathErr.Error()
		path = &registryPath{}
	} else {
		event.Received = marshalPath(path)
	}

	// token.FromContext: exactly one token and one expiry that parses, or the sdk goes on with
	// no caller token (a warning). The token's check here is for the driver; the sdk's
	// authorize would make it with OPA.
	tokens, expiries := md.Get(tokenKey), md.Get(expiresKey)
	callerToken := ""
	if len(tokens) == 1 && len(expiries) == 1 {
		if _, err := time.Parse(time.RFC3339Nano, expiries[0]); err == nil {
			callerToken = tokens[0]
		}
	}
	if callerToken != "" {
		event.Token = callerToken
		event.TokenCheck = checkToken(callerToken, info.State.PeerCertificates[0].PublicKey)
	}
	ownToken, _, err := signForPeer(key, ownID, ownNotAfter, lifetime, p)
	if err != nil {
		return "", status.Error(codes.Internal, err.Error())
	}
	event.OwnToken = ownToken

	index, err := updateRegistryPath(path, callerToken, ownToken)
	if err != nil {
		// A plain error from a handler is UNKNOWN in grpc-go, as it is from the sdk's chain.
		return "", status.Error(codes.Unknown, err.Error())
	}
	if !answerPath {
		return "", nil
	}
	// The sdk sends the header after the rest of its chain took the call, with the caller's
	// index put back.
	path.Index = index
	answer := marshalPath(path)
	if err := stream.SendHeader(metadata.Pairs(pathKey, answer)); err != nil {
		event.HeaderError = err.Error()
	}
	return answer, nil
}

// registerResult is what register prints per call.
type registerResult struct {
	Method     string         `json:"method"`
	Code       string         `json:"code"`
	Message    string         `json:"message,omitempty"`
	PeerID     string         `json:"peer_id,omitempty"`
	ALPN       string         `json:"alpn,omitempty"`
	CallMillis float64        `json:"call_ms"`
	Sent       string         `json:"sent_path"`              // the `path` value we sent
	SentToken  string         `json:"sent_token,omitempty"`   // our nsm-client-token
	Header     []string       `json:"header_path"`            // the `path` values answered
	PathError  string         `json:"path_error,omitempty"`   // json.Unmarshal's complaint
	Held       string         `json:"held"`                   // json.Marshal of the path kept
	Checks     []verifyResult `json:"token_checks"`           // golang-jwt per held segment
	ReplyLen   int            `json:"reply_len"`              // bytes of the answer message
	Expires    string         `json:"sent_expires,omitempty"` // our nsm-client-token-expires
}

// registerCommand is an sdk registry client for one endpoint over one connection: per-RPC
// token credentials, and the grpcmetadata client, which sends the path it holds as JSON with
// every call (an empty path the first time) and takes the one answered in the `path` header
// (the last value; none, or one that does not decode, leaves the held path as it was). It makes
// the calls of -calls in order and prints one registerResult per call. Each token of the held
// path is checked with golang-jwt: the one at our index against our own leaf, the next one
// against the TLS peer's.
func registerCommand(args []string) error {
	flags := flag.NewFlagSet("register", flag.ExitOnError)
	var files tlsFiles
	files.register(flags)
	socket := flags.String("socket", "", "UNIX socket path of the registry")
	inPath := flags.String("in", "", "file with the serialized NetworkServiceEndpoint")
	calls := flags.String("calls", "Register,Register,Unregister", "NSE registry methods to call, in order")
	lifetime := flags.Duration("lifetime", 10*time.Minute, "token lifetime")
	timeout := flags.Duration("timeout", 10*time.Second, "deadline per call")
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
	creds, err := newCredentials(own, *lifetime, time.UTC)
	if err != nil {
		return err
	}
	conn, err := dialUnix(context.Background(), *socket, own, roots, grpc.WithPerRPCCredentials(creds))
	if err != nil {
		return err
	}
	defer conn.Close()

	held := &registryPath{} // the sdk's PathFromContext gives an empty path to start with
	for _, name := range strings.Split(*calls, ",") {
		result := registerResult{Method: "/registry.NetworkServiceEndpointRegistry/" + name}
		result.Sent = marshalPath(held)
		ctx, cancel := context.WithTimeout(context.Background(), *timeout)
		ctx = metadata.AppendToOutgoingContext(ctx, pathKey, result.Sent)
		var response []byte
		var header metadata.MD
		var answeredBy peer.Peer
		started := time.Now()
		err := conn.Invoke(ctx, result.Method, &request, &response,
			grpc.ForceCodec(rawCodec{}), grpc.Header(&header), grpc.Peer(&answeredBy))
		cancel()
		result.CallMillis = millis(time.Since(started))
		result.Code = status.Code(err).String()
		creds.mu.Lock()
		result.SentToken, result.Expires = creds.token, creds.expires
		creds.mu.Unlock()
		result.Header = header.Get(pathKey)
		if result.Header == nil {
			result.Header = []string{}
		}
		info, alpn, _, peerID := tlsPeer(answeredBy)
		result.ALPN, result.PeerID = alpn, peerID
		if err != nil {
			// The sdk's client leaves its path alone when the call fails.
			result.Message = status.Convert(err).Message()
		} else {
			result.ReplyLen = len(response)
			answered, err := pathFromMetadata(result.Header)
			if err != nil {
				result.PathError = err.Error()
			} else {
				held = answered
			}
		}
		result.Held = marshalPath(held)
		result.Checks = checkPathTokens(held, own.Leaf.PublicKey, info)
		printJSON(result)
	}
	return nil
}

// checkPathTokens checks each token of a held path with golang-jwt where we know the signer:
// at the path's index it is ours, after it the TLS peer's. Other segments get an error result.
func checkPathTokens(path *registryPath, ownKey interface{}, info credentials.TLSInfo) []verifyResult {
	checks := []verifyResult{}
	for position, segment := range path.PathSegments {
		var signer interface{}
		switch {
		case position == int(path.Index):
			signer = ownKey
		case position == int(path.Index)+1 && len(info.State.PeerCertificates) > 0:
			signer = info.State.PeerCertificates[0].PublicKey
		}
		if segment == nil || signer == nil {
			checks = append(checks, verifyResult{Error: "no segment, or no key known for it"})
			continue
		}
		checks = append(checks, checkToken(segment.Token, signer))
	}
	return checks
}

// pathJSONCommand runs encoding/json on paths for a table comparison: stdin holds
// {"decode": [base64 of a path value, ...], "encode": [{"index": n, "tokens": [...]}, ...]};
// each text is decoded into the sdk's Path (and re-encoded), each value is encoded. Texts come
// as base64 so that bytes which are not UTF-8 reach json.Unmarshal as they are.
func pathJSONCommand(args []string) error {
	flags := flag.NewFlagSet("pathjson", flag.ExitOnError)
	if err := flags.Parse(args); err != nil {
		return err
	}
	var input struct {
		Decode []string `json:"decode"`
		Encode []struct {
			Index  uint32   `json:"index"`
			Tokens []string `json:"tokens"`
		} `json:"encode"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		return fmt.Errorf("stdin: %w", err)
	}
	// decoded: a null segment shows as a null token, to tell it from an empty one.
	type decoded struct {
		Error  string    `json:"error,omitempty"`
		Index  uint32    `json:"index"`
		Tokens []*string `json:"tokens"`
		Nil    bool      `json:"nil_segments"` // PathSegments decoded as a nil slice
		Again  string    `json:"again,omitempty"`
	}
	output := struct {
		Decoded []decoded `json:"decoded"`
		Encoded []string  `json:"encoded"`
	}{[]decoded{}, []string{}}
	for _, text := range input.Decode {
		raw, err := base64.StdEncoding.DecodeString(text)
		if err != nil {
			return fmt.Errorf("decode: %w", err)
		}
		var result decoded
		path := &registryPath{}
		if err := json.Unmarshal(raw, path); err != nil {
			result.Error = err.Error()
			output.Decoded = append(output.Decoded, result)
			continue
		}
		result.Index, result.Nil, result.Tokens = path.Index, path.PathSegments == nil, []*string{}
		for _, segment := range path.PathSegments {
			if segment == nil {
				result.Tokens = append(result.Tokens, nil)
			} else {
				token := segment.Token
				result.Tokens = append(result.Tokens, &token)
			}
		}
		result.Again = marshalPath(path)
		output.Decoded = append(output.Decoded, result)
	}
	for _, value := range input.Encode {
		path := &registryPath{Index: value.Index}
		for _, token := range value.Tokens {
			path.PathSegments = append(path.PathSegments, &registryPathSegment{Token: token})
		}
		output.Encoded = append(output.Encoded, marshalPath(path))
	}
	printJSON(output)
	return nil
}
