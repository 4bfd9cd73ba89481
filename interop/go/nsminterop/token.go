package main

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/ioutil"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v4"
)

// signCommand makes a token the way NSM's spiffejwt.TokenGeneratorFunc does: RegisteredClaims
// with only Subject, Audience (one element, when there is a TLS peer) and ExpiresAt, signed
// ES256 with the SVID key through golang-jwt. The expiry is printed with time.RFC3339Nano, as
// the sdk's per-RPC credentials put it into nsm-client-token-expires.
func signCommand(args []string) error {
	flags := flag.NewFlagSet("sign", flag.ExitOnError)
	keyPath := flags.String("key", "", "PEM file with the signer's PKCS#8 EC P-256 key")
	sub := flags.String("sub", "", "the signer's SPIFFE ID")
	aud := flags.String("aud", "", "the peer's SPIFFE ID (empty: no aud, as without a TLS peer)")
	expText := flags.String("exp", "", "expiry, RFC 3339 (default: now + -lifetime)")
	lifetime := flags.Duration("lifetime", 10*time.Minute, "token lifetime when -exp is not given")
	zone := flags.String("zone", "Z", "zone to print the expiry in: Z or ±hh:mm (a Go peer prints its local zone)")
	if err := flags.Parse(args); err != nil {
		return err
	}
	key, err := readECKey(*keyPath)
	if err != nil {
		return err
	}
	location, err := parseZone(*zone)
	if err != nil {
		return err
	}
	var expires time.Time
	if *expText != "" {
		expires, err = time.Parse(time.RFC3339Nano, *expText)
		if err != nil {
			return fmt.Errorf("-exp: %w", err)
		}
	} else {
		// time.Now carries nanoseconds (and a monotonic reading, which formatting ignores):
		// the expiry a Go peer sends has full precision, unlike the claim.
		expires = time.Now().Add(*lifetime)
	}

	claims := jwt.RegisteredClaims{
		Subject:   *sub,
		ExpiresAt: jwt.NewNumericDate(expires),
	}
	if *aud != "" {
		claims.Audience = []string{*aud}
	}
	token, err := jwt.NewWithClaims(jwt.SigningMethodES256, claims).SignedString(key)
	if err != nil {
		return err
	}
	printJSON(map[string]interface{}{
		"token":   token,
		"expires": expires.In(location).Format(time.RFC3339Nano),
	})
	return nil
}

// verifyResult is what verify prints; the raw header and payload are decoded here too so that
// the driver can compare them with what Python decoded, field by field.
type verifyResult struct {
	OK              bool                   `json:"ok"`
	Error           string                 `json:"error,omitempty"`
	Header          map[string]interface{} `json:"header,omitempty"`
	Sub             string                 `json:"sub,omitempty"`
	Aud             []string               `json:"aud,omitempty"`
	Exp             *int64                 `json:"exp,omitempty"`
	ClaimsJSON      string                 `json:"claims_json,omitempty"`
	Expires         string                 `json:"expires,omitempty"`
	ExpiresUnixNano *int64                 `json:"expires_unix_nano,omitempty"`
	ExpiresError    string                 `json:"expires_error,omitempty"`
}

// verifyCommand checks a token (read from stdin) with golang-jwt against the public key of a
// certificate (the signer's leaf, as NSM's prev_token_signed policy uses the TLS peer's), and
// parses an expiry string with time.Parse(time.RFC3339Nano) as the sdk's token.FromContext
// does. A refusal is a result (ok=false), not an error of the tool.
func verifyCommand(args []string) error {
	flags := flag.NewFlagSet("verify", flag.ExitOnError)
	certPath := flags.String("cert", "", "PEM file whose first certificate signed the token")
	expiresText := flags.String("expires", "", "an nsm-client-token-expires value to parse")
	if err := flags.Parse(args); err != nil {
		return err
	}
	certificates, err := readCertificates(*certPath)
	if err != nil {
		return err
	}
	raw, err := ioutil.ReadAll(os.Stdin)
	if err != nil {
		return err
	}
	result := checkToken(strings.TrimSpace(string(raw)), certificates[0].PublicKey)
	if *expiresText != "" {
		expires, err := time.Parse(time.RFC3339Nano, *expiresText)
		if err != nil {
			result.ExpiresError = err.Error()
		} else {
			nanos := expires.UnixNano()
			result.ExpiresUnixNano = &nanos
			result.Expires = expires.UTC().Format(time.RFC3339Nano)
		}
	}
	printJSON(result)
	return nil
}

// checkToken verifies an ES256 token with golang-jwt (only ES256 accepted, claims validated:
// an expired token fails here as NSM's tokens_expired would fail it).
func checkToken(token string, publicKey interface{}) verifyResult {
	var result verifyResult
	parser := jwt.NewParser(jwt.WithValidMethods([]string{jwt.SigningMethodES256.Alg()}))
	claims := &jwt.RegisteredClaims{}
	parsed, err := parser.ParseWithClaims(token, claims, func(*jwt.Token) (interface{}, error) {
		return publicKey, nil
	})
	if err != nil {
		result.Error = err.Error()
		return result
	}
	if !parsed.Valid {
		result.Error = "golang-jwt says the token is not valid"
		return result
	}
	result.OK = true
	result.Header = parsed.Header
	result.Sub = claims.Subject
	result.Aud = claims.Audience
	if claims.ExpiresAt != nil {
		exp := claims.ExpiresAt.Unix()
		result.Exp = &exp
	}
	// The payload as sent, for a byte comparison by the driver.
	if parts := strings.Split(token, "."); len(parts) == 3 {
		if payload, err := base64.RawURLEncoding.DecodeString(parts[1]); err == nil {
			result.ClaimsJSON = string(payload)
		}
	}
	return result
}

// timesCommand formats nanosecond instants with time.RFC3339Nano (in UTC and in a given zone)
// and parses strings with it, so that the driver compares Go's clock text with its own both
// ways. Input on stdin: {"format_ns": [...], "parse": [...], "zone": "+05:30"}.
func timesCommand(args []string) error {
	flags := flag.NewFlagSet("times", flag.ExitOnError)
	if err := flags.Parse(args); err != nil {
		return err
	}
	var input struct {
		FormatNs []int64  `json:"format_ns"`
		Parse    []string `json:"parse"`
		Zone     string   `json:"zone"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&input); err != nil {
		return fmt.Errorf("stdin: %w", err)
	}
	location, err := parseZone(input.Zone)
	if err != nil {
		return err
	}
	type parsed struct {
		UnixNano *int64 `json:"unix_nano,omitempty"`
		Error    string `json:"error,omitempty"`
	}
	output := struct {
		FormattedUTC  []string `json:"formatted_utc"`
		FormattedZone []string `json:"formatted_zone"`
		Parsed        []parsed `json:"parsed"`
	}{[]string{}, []string{}, []parsed{}}
	for _, nanos := range input.FormatNs {
		instant := time.Unix(0, nanos)
		output.FormattedUTC = append(output.FormattedUTC, instant.UTC().Format(time.RFC3339Nano))
		output.FormattedZone = append(output.FormattedZone, instant.In(location).Format(time.RFC3339Nano))
	}
	for _, text := range input.Parse {
		instant, err := time.Parse(time.RFC3339Nano, text)
		if err != nil {
			output.Parsed = append(output.Parsed, parsed{Error: err.Error()})
			continue
		}
		nanos := instant.UnixNano()
		output.Parsed = append(output.Parsed, parsed{UnixNano: &nanos})
	}
	printJSON(output)
	return nil
}

// parseZone turns "Z" (or "") into UTC and "±hh:mm" into a fixed zone.
func parseZone(text string) (*time.Location, error) {
	if text == "" || text == "Z" {
		return time.UTC, nil
	}
	if len(text) != 6 || (text[0] != '+' && text[0] != '-') || text[3] != ':' {
		return nil, errors.New("a zone is Z or ±hh:mm")
	}
	hours, err1 := strconv.Atoi(text[1:3])
	minutes, err2 := strconv.Atoi(text[4:6])
	if err1 != nil || err2 != nil {
		return nil, errors.New("a zone is Z or ±hh:mm")
	}
	offset := hours*3600 + minutes*60
	if text[0] == '-' {
		offset = -offset
	}
	return time.FixedZone(text, offset), nil
}
